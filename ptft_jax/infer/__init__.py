"""Using a finished run: predict.py (`ptft predict`, `ptft eval`), embed.py (`ptft embed`),
export.py (`ptft export`, to a Hugging Face directory)."""
