"""Plain-text corpora: one document per line, optionally gzipped; the bundled one is `bundled:kjv`."""
from __future__ import annotations

import gzip
from pathlib import Path

BUNDLED = {"kjv": Path(__file__).with_name("corpora") / "kjv.txt.gz"}


def resolve(corpus: str) -> Path:
    if corpus.startswith("bundled:"):
        name = corpus.split(":", 1)[1]
        if name not in BUNDLED:
            raise ValueError(f"data.corpus '{corpus}': no bundled corpus '{name}'. "
                             f"Bundled: {', '.join('bundled:' + n for n in BUNDLED)}.")
        return BUNDLED[name]
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ValueError(f"data.corpus '{corpus}' is not a file. Give a text file with one "
                         f"document per line (.txt or .txt.gz), or 'bundled:kjv'.")
    return path


def read_documents(corpus: str) -> list[str]:
    """Non-empty lines of the corpus, stripped. Raises on empty or non-UTF-8 files."""
    path = resolve(corpus)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            docs = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}). Convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`.") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path}: the corpus holds no text (every line is empty).")
    return docs
