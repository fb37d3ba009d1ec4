"""Conversion to and from other formats: Hugging Face directories (config.json, safetensors,
tokenizer files) in `hf.py` (reading), `hf_weights.py` (tensor names and layouts) and
`hf_export.py` (writing)."""
