"""Labelled examples packed several to a row (`data.packing: pack` when finetuning).

Real labelled texts are short: padded one to a row of `data.seq_len`, most of every row is
padding that the step computes for nothing. Here each row holds up to `slots` examples, each
its own segment (segment ids 1..slots, positions restarting at 0, its own type ids), laid out
exactly as its padded row would begin (data/labelled.py), so attention (which never crosses
segments) sees each example as it sees it alone. Labels and weights come per slot:
`label` [rows, slots(, classes)], `weight` [rows, slots] (0 for an empty slot). The task pools
each segment (models/heads.py, pool_segments) and counts each example once.

Which examples share a row is decided once, from the seed: examples in a seeded random order
(input order for evaluation), each put into the first of the last few open rows with room for
its tokens and a free slot, else into a new row. The rows are then a fixed set that the batch
loader shuffles each epoch, as it shuffles pretraining's packed rows; a resumed run reads the
same rows.
"""
from __future__ import annotations

import numpy as np

from ptft_jax.data.batching import PaddedBatches

OPEN_ROWS = 8  # rows still taking examples: a wider window packs a little tighter, slower


def plan_rows(lengths: np.ndarray, seq_len: int, slots: int, order: np.ndarray):
    """(members, starts): the examples of row r are members[starts[r]:starts[r + 1]], in
    the order they sit in it. Each example's tokens (`lengths`, at most seq_len) fit its row."""
    open_rows: list[list] = []  # [row number, tokens used]
    rows: list[list[int]] = []
    for example in order.tolist():
        need = int(lengths[example])
        for row in open_rows:
            if row[1] + need <= seq_len and len(rows[row[0]]) < slots:
                row[1] += need
                rows[row[0]].append(example)
                break
        else:
            rows.append([example])
            open_rows.append([len(rows) - 1, need])
            if len(open_rows) > OPEN_ROWS:
                open_rows.pop(0)
    starts = np.zeros(len(rows) + 1, np.int64)
    starts[1:] = np.cumsum([len(r) for r in rows])
    members = np.fromiter((e for r in rows for e in r), np.int64, count=int(starts[-1]))
    return members, starts


class PackedExamples(PaddedBatches):
    """An Examples split (data/labelled.py) as rows of up to `slots` examples each."""

    def __init__(self, examples, slots: int, seed: int | None):
        """`seed` None: examples in input order (evaluation); else a seeded random order."""
        self.examples, self.slots = examples, slots
        self.seq_len = examples.seq_len
        order = np.arange(len(examples)) if seed is None else \
            np.random.default_rng(seed).permutation(len(examples))
        self.members, self.starts = plan_rows(examples.lengths, self.seq_len, slots, order)
        self.truncated = examples.truncated

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def examples_per_row(self) -> float:
        return len(self.examples) / max(len(self), 1)

    def rows_holding(self, examples: int, multiple: int = 1) -> int:
        """Rows that hold `examples` examples on average, to the nearest multiple of
        `multiple` (what the mesh splits evenly; at least one): a batch size in examples, as
        rows."""
        needed = examples / self.examples_per_row
        return max(1, round(needed / multiple)) * multiple

    def in_input_order(self, per_slot):
        """Outputs per (row, slot) [rows, slots, ...] -> per example [examples, ...], in the
        examples' own order (an array or a dict of arrays)."""
        counts = np.diff(self.starts)
        row = np.repeat(np.arange(len(self)), counts)
        slot = np.arange(len(self.members)) - np.repeat(self.starts[:-1], counts)

        def one(values):
            values = np.asarray(values)
            out = np.empty((len(self.members), *values.shape[2:]), values.dtype)
            out[self.members] = values[row, slot]
            return out
        return {k: one(v) for k, v in per_slot.items()} if isinstance(per_slot, dict) else \
            one(per_slot)

    def rows(self, index) -> dict[str, np.ndarray]:
        index = np.asarray(index, np.int64)
        counts = self.starts[index + 1] - self.starts[index]
        member_rows = np.repeat(np.arange(len(index)), counts)  # row (in this batch) of each
        first = np.repeat(np.cumsum(counts) - counts, counts)
        slot = np.arange(len(member_rows)) - first  # each member's slot in its row
        ids = np.concatenate([self.members[self.starts[i]:self.starts[i + 1]] for i in index])
        padded = self.examples.rows(ids)
        lengths = self.examples.lengths[ids]
        # Where each member starts: in the batch's tokens laid end to end, then in its row.
        begin = np.cumsum(lengths) - lengths
        offset = begin - begin[first]
        token_member = np.repeat(np.arange(len(ids)), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(begin, lengths)
        out_row = member_rows[token_member]
        out_col = offset[token_member] + within
        n, T = len(index), self.seq_len
        out = {}
        for name in ("tokens", "positions", "type_ids"):
            column = np.full((n, T), self.examples.pad_id if name == "tokens" else 0, np.int32)
            column[out_row, out_col] = padded[name][token_member, within]
            out[name] = column
        segments = np.zeros((n, T), np.int32)
        segments[out_row, out_col] = slot[token_member] + 1
        out["segment_ids"] = segments
        out["weight"] = np.zeros((n, self.slots), np.float32)
        out["weight"][member_rows, slot] = 1.0
        if "label" in padded:
            label = padded["label"]
            out["label"] = np.zeros((n, self.slots, *label.shape[1:]), label.dtype)
            out["label"][member_rows, slot] = label
        return out

