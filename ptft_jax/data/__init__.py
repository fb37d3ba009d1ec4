"""Data: text sources and opening (sources.py, opening.py), tokenizers, the token cache and
packing (cache.py, packing.py), the batch loader, labelled examples (labelled.py), image
sources, decoding and the image cache (image_sources.py, image_io.py, images.py, augment.py),
image-text pairs (pairs.py, emoji.py), atomic file writes (fs.py), and the data tools'
commands (commands.py)."""
