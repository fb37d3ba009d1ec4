"""Packing documents into fixed-length sequences."""
from __future__ import annotations

import numpy as np


def pack(token_lists: list[list[int]], seq_len: int, bos_id: int | None, eos_id: int):
    """Concatenates `[bos] doc [eos]` for every document and cuts the stream into rows of
    `seq_len` tokens. Returns (int32 array [rows, seq_len], tokens dropped from the tail)."""
    pieces = []
    for ids in token_lists:
        if bos_id is not None:
            pieces.append([bos_id])
        pieces.append(ids)
        pieces.append([eos_id])
    stream = np.fromiter((t for p in pieces for t in p), dtype=np.int32)
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"The corpus has {len(stream)} tokens, fewer than one sequence of "
                         f"data.seq_len={seq_len}; give more text or a shorter data.seq_len.")
    return stream[: rows * seq_len].reshape(rows, seq_len), len(stream) - rows * seq_len
