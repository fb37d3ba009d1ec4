"""The bundled corpora, and reading a whole corpus into memory; `sources.py` has the sources."""
from __future__ import annotations

from ptft_jax.config.schema import DataConfig
from ptft_jax.data.opening import open_documents
from ptft_jax.data.sources import BUNDLED

__all__ = ["BUNDLED", "read_documents"]


def read_documents(corpus: str) -> list[str]:
    """Every non-empty document of `corpus` (any data.corpus form, with the default format,
    text column and split). Raises ValueError on a missing, empty or non-UTF-8 corpus."""
    documents = open_documents(DataConfig(corpus=corpus))
    return documents.texts(0, len(documents))
