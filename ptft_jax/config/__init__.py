"""The config: schema.py (dataclasses, presets, ConfigError, task names), load.py (YAML,
`a.b=value` overrides, coercion, did-you-mean), hf.py (what an `hf:` model's config.json
sets), ranges.py (each key's own range, finiteness and choices), validate.py (every check
that needs no compile: the ranges, then what relates keys)."""
