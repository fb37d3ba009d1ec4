"""Conversion from other formats: Hugging Face weights (`hf.py` reads safetensors,
`hf_weights.py` maps tensor names and layouts both ways). config/hf.py reads an HF model's
config.json; infer/export.py writes a run as an HF directory."""
