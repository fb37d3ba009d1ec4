"""Checkpoints: checkpoint.py (Orbax save / restore, exact resume), integrity.py (checksums,
damage found and moved aside), pretrained.py (a component restored into another model)."""
