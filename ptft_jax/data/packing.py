"""Fixed-length rows from tokenized documents, with segment ids and positions.

Documents come as one token stream plus offsets (`tokens[offsets[d]:offsets[d + 1]]` is
document d), which is how the pre-tokenized cache stores them; each document is wrapped as
`[bos] doc [eos]`. Two layouts:

- `pack`: documents follow each other across rows. Segment ids (1, 2, ... within a row) keep
  packed documents from attending to each other, and positions restart at every document and
  at every row start, so a document cut by a row boundary continues as a new segment.
- `pad`: one document per row; a document longer than a row continues on the next rows, and a
  row's tail is padding (segment id 0).

Rows are built on demand, vectorised over a whole batch, so a memory-mapped stream of any size
costs no more than the batches read from it. Only the last partial row of `pack` is dropped,
and its token count is reported.
"""
from __future__ import annotations

import numpy as np


class Packer:
    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int,
                 bos_id: int | None, eos_id: int, mode: str = "pack"):
        if mode not in ("pack", "pad"):
            raise ValueError(f"packing mode '{mode}': use 'pack' or 'pad'.")
        self.tokens, self.offsets = tokens, np.asarray(offsets, np.int64)
        self.seq_len, self.bos_id, self.eos_id, self.mode = seq_len, bos_id, eos_id, mode
        self.lead = 0 if bos_id is None else 1
        lengths = np.diff(self.offsets) + self.lead + 1  # each document with its specials
        if mode == "pack":
            # Start of each wrapped document in the virtual stream of all of them.
            self.starts = np.concatenate([[0], np.cumsum(lengths)])
            total = int(self.starts[-1])
            self.num_rows = total // seq_len
            self.dropped_tokens = total - self.num_rows * seq_len
        else:
            rows_per_doc = -(-lengths // seq_len)
            self.row_doc = np.repeat(np.arange(len(lengths)), rows_per_doc)
            first_row = np.concatenate([[0], np.cumsum(rows_per_doc)])[:-1]
            self.row_part = np.arange(len(self.row_doc)) - np.repeat(first_row, rows_per_doc)
            self.num_rows = len(self.row_doc)
            self.dropped_tokens = 0
        if self.num_rows == 0:
            raise ValueError(f"The corpus has {int(lengths.sum())} tokens, fewer than one row of "
                             f"data.seq_len={seq_len}; give more text or a shorter data.seq_len.")

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index` as int32 arrays [len(index), seq_len]: tokens, segment_ids, positions."""
        index = np.asarray(index, np.int64)
        col = np.arange(self.seq_len)
        if self.mode == "pack":
            virtual = index[:, None] * self.seq_len + col  # positions in the virtual stream
            doc = np.searchsorted(self.starts, virtual, side="right") - 1
            within = virtual - self.starts[doc]
            row_start = index[:, None] * self.seq_len
            # Positions restart where the document (or, for a cut document, the row) starts.
            positions = virtual - np.maximum(self.starts[doc], row_start)
            segment_ids = doc - doc[:, :1] + 1
            valid = np.ones_like(virtual, dtype=bool)
        else:
            doc = np.broadcast_to(self.row_doc[index][:, None], (len(index), self.seq_len))
            within = self.row_part[index][:, None] * self.seq_len + col
            wrapped_len = np.diff(self.offsets)[doc] + self.lead + 1
            valid = within < wrapped_len
            positions = np.where(valid, col, 0)
            segment_ids = valid.astype(np.int64)
        body = within - self.lead  # index into the document's own tokens
        doc_len = self.offsets[doc + 1] - self.offsets[doc]
        is_body = valid & (body >= 0) & (body < doc_len)
        source = np.where(is_body, self.offsets[doc] + body, 0)
        tokens = np.where(is_body, self.tokens[source], self.eos_id)
        if self.bos_id is not None:
            tokens = np.where(valid & (within == 0), self.bos_id, tokens)
        tokens = np.where(valid, tokens, 0)  # padding
        return {"tokens": tokens.astype(np.int32),
                "segment_ids": np.where(valid, segment_ids, 0).astype(np.int32),
                "positions": positions.astype(np.int32)}
