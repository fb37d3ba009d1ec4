"""Labelled examples for finetuning: texts (or text pairs) with labels, one padded row each
(packed_examples.py packs these rows several to a row).

Texts are tokenized once into the same pre-tokenized cache that pretraining uses (one cache
per split and text column), labels map to ids through a `LabelSpace` saved in the run
directory, and rows are built on demand, vectorised over a batch:

    encoder:  [CLS] a [SEP]            or  [CLS] a [SEP] b [SEP]       (type ids 0 ... 0 1 ... 1)
    decoder:  a <|endoftext|>          or  a <|endoftext|> b <|endoftext|>

A text longer than `seq_len` is cut (for pairs, the longer text first) and counted. Evaluation
and prediction read a split in order, once, in fixed-size batches; the last batch is padded
with copies of a real row whose `weight` is 0, so every sum counts each example exactly once
and no row is all padding (which would make attention's softmax empty).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft_jax.config.reading import UnreadableFile, read_json
from ptft_jax.core.files import atomic_write_json
from ptft_jax.data.batching import PaddedBatches
from ptft_jax.data.cache_build import prepare_cache_once
from ptft_jax.data.opening import open_documents
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer

log = logging.getLogger(__name__)

TASK_KINDS = ("classification", "multi_label", "regression")


@dataclass(frozen=True)
class LabelSpace:
    kind: str  # one of TASK_KINDS
    names: tuple = ()  # label names; a label's id is its index. Empty for regression.

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.names)

    @classmethod
    def from_labels(cls, kind: str, raw: list, where: str = "the training labels"
                    ) -> "LabelSpace":
        """The label space of a training split: its sorted label names (ints sorted as
        numbers), or none for regression."""
        _check_present(raw, where)
        if kind == "regression":
            _as_floats(raw, where)
            return cls(kind)
        values = [_names_of(v) for v in raw] if kind == "multi_label" else [[v] for v in raw]
        unique = {v for names in values for v in names}
        quoted = sorted(v for v in unique if isinstance(v, str) and len(v) > 1
                        and v[0] == v[-1] == '"')
        if quoted:  # how Arrow reads a JSON column that mixes numbers and strings
            raise ValueError(f"{where} mix numbers and text (text labels such as "
                             f"{quoted[0]} beside numbers): write every label of the column "
                             f"as text, or every one as a number.")
        ordered = sorted(unique, key=lambda v: (isinstance(v, str), v if not isinstance(v, str)
                                                else 0, str(v)))
        names = tuple(str(v) for v in ordered)
        if kind == "classification" and len(names) < 2:
            raise ValueError(f"{where} hold {len(names)} class(es) ({list(names)}); "
                             f"classification needs at least 2.")
        return cls(kind, names)

    def encode(self, raw: list, where: str) -> np.ndarray:
        """Label ids (classification), multi-hot rows (multi-label) or values (regression)."""
        _check_present(raw, where)
        if self.kind == "regression":
            return _as_floats(raw, where)
        index = {n: i for i, n in enumerate(self.names)}
        rows = [_names_of(v) if self.kind == "multi_label" else [v] for v in raw]
        unseen = sorted({str(n) for names in rows for n in names if str(n) not in index})
        if unseen:
            count = sum(any(str(n) not in index for n in names) for names in rows)
            raise ValueError(f"{where}: label(s) {', '.join(repr(u) for u in unseen[:10])} "
                             f"({count} example(s)) were not in the training labels "
                             f"{list(self.names)}; a model cannot predict a class it never "
                             f"saw. Drop those examples or retrain with them.")
        if self.kind == "classification":
            return np.asarray([index[str(names[0])] for names in rows], np.int32)
        out = np.zeros((len(rows), len(self.names)), np.float32)
        for i, names in enumerate(rows):
            out[i, [index[str(n)] for n in names]] = 1.0
        return out

    def save(self, path) -> None:
        atomic_write_json(Path(path), {"kind": self.kind, "names": list(self.names)})

    @classmethod
    def load(cls, path) -> "LabelSpace":
        data = read_json(path, "a run's labels.json")
        if data.get("kind") not in TASK_KINDS or not isinstance(data.get("names"), list):
            raise UnreadableFile(f"{path}: holds {data!r:.80}; a run's labels.json must hold "
                                 f"{{\"kind\": one of {', '.join(TASK_KINDS)}, \"names\": "
                                 f"[...]}}, as ptft wrote it (start a new run_dir).")
        return cls(data["kind"], tuple(data["names"]))


def _names_of(value) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _check_present(raw: list, where: str) -> None:
    missing = [i for i, v in enumerate(raw) if v is None]
    if missing:
        raise ValueError(f"{where}: example(s) {missing[:5]} have no label (null); fill them or "
                         f"drop those examples.")


def _as_floats(raw: list, where: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in raw], np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in raw if not _is_number(v))
        raise ValueError(f"{where}: regression labels must be numbers, got {bad!r}.") from None
    # NaN / inf (or a value past float32's range) would make every batch that holds it a
    # skipped step: refused here, naming the examples.
    bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max))
    if bad.size:
        raise ValueError(f"{where}: regression label(s) of example(s) {bad[:5].tolist()} are not "
                         f"finite float32 numbers ({values[bad[0]]!r}); fix or drop them.")
    return values.astype(np.float32)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


class Examples(PaddedBatches):
    """One split: tokenized texts (optionally pairs) and encoded labels; rows on demand."""

    def __init__(self, first, second, labels, seq_len: int, cls_id: int | None, sep_id: int,
                 pad_id: int = 0):
        # Each example's first token in its column's stream: a subset keeps the streams.
        a_offsets = np.asarray(first[1], np.int64)
        self.a_tokens, self.a_starts = first[0], a_offsets[:-1]
        self.pair = second is not None
        if self.pair:
            b_offsets = np.asarray(second[1], np.int64)
            self.b_tokens, self.b_starts = second[0], b_offsets[:-1]
            if len(b_offsets) != len(a_offsets):
                raise ValueError("the two text columns hold different numbers of examples")
        self.labels = labels
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        la = np.diff(a_offsets)
        lb = np.diff(b_offsets) if self.pair else np.zeros_like(la)
        budget = seq_len - (cls_id is not None) - 1 - (1 if self.pair else 0)
        if budget < (2 if self.pair else 1):
            raise ValueError(f"data.seq_len={seq_len} leaves no room for text beside the "
                             f"special tokens; raise data.seq_len.")
        self.full_lengths = la + lb  # text tokens before truncation
        self.len_a, self.len_b = _longest_first(la, lb, budget)
        self.truncated = self._count_truncated()
        # Each example's tokens in its row, special tokens included (packing reads these).
        self.lengths = (cls_id is not None) + self.len_a + 1 + \
            ((self.len_b + 1) if self.pair else 0)

    def __len__(self) -> int:
        return len(self.a_starts)

    def subset(self, index: np.ndarray) -> "Examples":
        """These examples only (data.keep_labels, data.per_class), in the order given."""
        index = np.asarray(index, np.int64)
        part = copy.copy(self)
        for name in ("a_starts", "b_starts", "len_a", "len_b", "lengths", "full_lengths",
                     "labels"):
            if getattr(self, name, None) is not None:
                setattr(part, name, getattr(self, name)[index])
        part.truncated = part._count_truncated()
        return part

    def _count_truncated(self) -> int:
        """Examples cut to fit data.seq_len (the others keep their full length)."""
        return int(np.sum(self.full_lengths > self.len_a + self.len_b))

    def rows(self, index) -> dict[str, np.ndarray]:
        index = np.asarray(index, np.int64)
        T = self.seq_len
        col = np.arange(T)[None, :]
        ta, tb = self.len_a[index][:, None], self.len_b[index][:, None]
        start_a = 0 if self.cls_id is None else 1
        a_pos = col - start_a
        is_a = (a_pos >= 0) & (a_pos < ta)
        sep1 = start_a + ta
        b_pos = col - sep1 - 1
        is_b = self.pair & (b_pos >= 0) & (b_pos < tb)
        sep2 = sep1 + 1 + tb
        is_sep = (col == sep1) | (self.pair & (col == sep2))
        length = (sep2 if self.pair else sep1) + 1
        valid = col < length
        a_src = self.a_starts[index][:, None] + np.clip(a_pos, 0, None)
        tokens = np.where(is_a, np.asarray(self.a_tokens[np.where(is_a, a_src, 0)]), self.pad_id)
        if self.pair:
            b_src = self.b_starts[index][:, None] + np.clip(b_pos, 0, None)
            tokens = np.where(is_b, np.asarray(self.b_tokens[np.where(is_b, b_src, 0)]), tokens)
        tokens = np.where(is_sep, self.sep_id, tokens)
        if self.cls_id is not None:
            tokens = np.where(col == 0, self.cls_id, tokens)
        second = is_b | (self.pair & (col == sep2))
        out = {"tokens": tokens.astype(np.int32),
               "segment_ids": valid.astype(np.int32),
               "positions": np.where(valid, col, 0).astype(np.int32),
               "type_ids": second.astype(np.int32),
               "weight": np.ones(len(index), np.float32)}
        if self.labels is not None:
            out["label"] = self.labels[index]
        return out


def select(label_ids: np.ndarray, keep: list[int] | None, per_class: int,
           seed: int) -> np.ndarray:
    """Row indices: only classes in `keep` (all when None); with `per_class`, the first N of
    each class after a seeded shuffle (the same rows for the same seed, in source order)."""
    rows = np.arange(len(label_ids))
    if keep is not None:
        rows = rows[np.isin(label_ids, keep)]
    if per_class:
        shuffled = np.random.default_rng([seed, 7]).permutation(rows)
        chosen = []
        for c in np.unique(label_ids[rows]):
            chosen.append(shuffled[label_ids[shuffled] == c][:per_class])
        rows = np.sort(np.concatenate(chosen)) if chosen else rows[:0]
    return rows


def _longest_first(la: np.ndarray, lb: np.ndarray, budget: int):
    """Cut lengths so la + lb <= budget, taking tokens from the longer text first."""
    la, lb = la.copy(), lb.copy()
    over = la + lb > budget
    keep_short = np.minimum(np.minimum(la, lb), budget // 2)  # the shorter text keeps up to half
    keep_long = budget - keep_short
    a_longer = la >= lb
    la = np.where(over, np.where(a_longer, keep_long, keep_short), la)
    lb = np.where(over, np.where(a_longer, keep_short, keep_long), lb)
    return la, lb


def _kept_rows(raw: list, keep_labels, where: str) -> np.ndarray:
    """The rows whose label is one of data.keep_labels (every row when it is not set)."""
    if keep_labels is None:
        return np.arange(len(raw))
    keep, names = {str(v) for v in keep_labels}, [str(v) for v in raw]
    missing = sorted(keep - set(names))
    if missing:
        raise ValueError(f"data.keep_labels: {missing} are not labels of {where} (its labels: "
                         f"{sorted(set(names))[:20]}); list labels the data holds.")
    return np.flatnonzero([n in keep for n in names])


def _cache_dir(root: Path, corpus: str, split: str, column: str) -> Path:
    tag = hashlib.sha1(corpus.encode()).hexdigest()[:8]
    return Path(root) / f"{split}-{column}-{tag}"


def open_examples(data_cfg, split: str, tokenizer_path, cache_root, kind: str,
                  label_space: LabelSpace | None, model_kind: str, progress: bool = True,
                  corpus: str | None = None, per_class: int = 0
                  ) -> tuple[Examples, LabelSpace]:
    """The examples of one split, tokenized through the token cache, and the label space
    (built from this split when `label_space` is None: the training split). Classification
    keeps only the classes in data.keep_labels (when set) and, with `per_class`, the first N
    examples of each class after a shuffle seeded by data.shuffle_seed."""
    if kind not in TASK_KINDS:
        raise ValueError(f"train.task '{kind}' is not a finetuning task ({', '.join(TASK_KINDS)}).")
    if data_cfg.label_column is None:
        raise ValueError("data.label_column is not set: name the column that holds the labels.")
    cfg = dataclasses.replace(data_cfg, corpus=corpus or data_cfg.corpus)
    where = f"split '{split}' of {cfg.corpus}"
    documents = open_documents(cfg, split)
    if len(documents) == 0:
        raise ValueError(f"{where} has no examples; point data.corpus / data.eval_corpus or "
                         f"data.eval_split at a split with data.")
    columns = [(cfg.text_column, documents)]
    pair_column = getattr(cfg, "text_pair_column", None)
    if pair_column:
        try:  # the second texts are read as a text column: errors must name the pair key
            second = open_documents(dataclasses.replace(cfg, text_column=pair_column), split)
        except ValueError as e:
            raise ValueError(str(e).replace("data.text_column", "data.text_pair_column")) \
                from None
        if len(second) != len(documents):
            raise ValueError(f"{where}: data.text_column '{cfg.text_column}' has "
                             f"{len(documents)} non-empty texts but data.text_pair_column "
                             f"'{pair_column}' has {len(second)}; rows with an empty text are "
                             f"dropped, so both columns must be non-empty in the same rows.")
        columns.append((pair_column, second))
    streams = []
    for column, docs in columns:
        # Multi-host: process 0 tokenizes, the others open its cache (no race for the lock).
        cache = prepare_cache_once(docs, tokenizer_path,
                                   _cache_dir(cache_root, cfg.corpus, split, column),
                                   data_cfg.num_workers, progress=progress)
        streams.append((cache.tokens, cache.offsets))
    raw = documents.labels(0, len(documents))
    kept = _kept_rows(raw, data_cfg.keep_labels, where)
    if label_space is None:
        label_space = LabelSpace.from_labels(
            kind, [raw[i] for i in kept],
            f"the labels of {where} (data.label_column '{cfg.label_column}')")
    labels = label_space.encode([raw[i] for i in kept], where)
    ids = TokenIds.of(load_tokenizer(tokenizer_path), model_kind)
    examples = Examples(streams[0], streams[1] if pair_column else None, None,
                        data_cfg.seq_len, ids.bos_id, ids.eos_id).subset(kept)
    examples.labels = labels  # encoded for the kept rows only
    if per_class:  # the first N of each class after a seeded shuffle, in source order
        examples = examples.subset(select(labels, None, per_class, data_cfg.shuffle_seed))
    if examples.truncated:
        log.info("%s: %d of %d examples truncated to data.seq_len=%d", where,
                 examples.truncated, len(examples), data_cfg.seq_len)
    return examples, label_space


def predict_examples(texts: list[str], tokenizer, seq_len: int, model_kind: str,
                     pairs: list[str] | None = None) -> Examples:
    """Raw texts (and optional second texts) tokenized in memory, unlabelled."""
    return examples_of_ids(encode_texts(tokenizer, texts),
                           encode_texts(tokenizer, pairs) if pairs is not None else None,
                           tokenizer, seq_len, model_kind)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens, before truncation."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def examples_of_ids(first: list[list[int]], second: list[list[int]] | None, tokenizer,
                    seq_len: int, model_kind: str) -> Examples:
    """Unlabelled examples of texts already encoded (encode_texts): what a server gathers
    from several requests."""
    def stream(ids):
        offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        tokens = np.fromiter((t for i in ids for t in i), np.int32, int(offsets[-1]))
        return tokens, offsets
    ids = TokenIds.of(tokenizer, model_kind)
    return Examples(stream(first), stream(second) if second is not None else None, None,
                    seq_len, ids.bos_id, ids.eos_id)
