"""Subword tokenizers with HF `tokenizers`: WordPiece for encoders, byte-level BPE for decoders."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from ptft_jax.config.reading import read_json
from ptft_jax.core.files import atomic_write_json, atomic_write_text, step_folders

log = logging.getLogger(__name__)

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<|endoftext|>"]


def train_tokenizer(kind: str, documents, vocab_size: int, progress: bool = False,
                    extra_special_tokens=()) -> Tokenizer:
    """Trains a WordPiece (kind='encoder') or byte-level BPE (kind='decoder') tokenizer on an
    iterable of texts. Special tokens take the first ids: the ones the objectives need, then
    `extra_special_tokens`. `progress` shows the trainer's own progress bars."""
    base = WORDPIECE_SPECIALS if kind == "encoder" else BPE_SPECIALS
    specials = base + [t for t in extra_special_tokens if t not in base]
    if kind == "encoder":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                            special_tokens=specials,
                                            show_progress=progress)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
    tok.train_from_iterator(documents, trainer=trainer)
    if kind == "encoder":
        tok.model = _canonical_wordpiece(tok.get_vocab(), specials)
    log.info("trained a %s tokenizer: %d tokens", "WordPiece" if kind == "encoder" else "BPE",
             tok.get_vocab_size())
    return tok


def _canonical_wordpiece(vocab: dict[str, int], specials: list[str]) -> models.WordPiece:
    """The WordPiece trainer hands out ids in hash-map order, so two trainings on the same text
    can give the same tokens under different ids. Renumber them in a fixed order (special tokens
    first, then by length and text)."""
    rest = sorted((t for t in vocab if t not in specials), key=lambda t: (len(t), t))
    ordered = {t: i for i, t in enumerate(specials + rest)}
    return models.WordPiece(vocab=ordered, unk_token="[UNK]")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A HF tokenizer.json, or a BERT vocab.txt (one WordPiece token per line)."""
    path = Path(path)
    if path.is_dir():
        inside = [p.name for p in (path / "tokenizer.json", path / "vocab.txt") if p.is_file()]
        raise ValueError(f"Tokenizer file '{path}' is a folder; give the file itself" + (
            f" ({path / inside[0]})." if inside else ": a tokenizer.json or a BERT vocab.txt."))
    if not path.is_file():
        raise ValueError(f"Tokenizer file '{path}' does not exist; give a tokenizer.json or a "
                         f"BERT vocab.txt, or leave data.tokenizer null to train one on the "
                         f"corpus.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = None
    # Told apart by content, not name: a tokenizer.json is a JSON object, a vocab.txt is not.
    if text is not None and text.lstrip().startswith("{"):
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises bare Exceptions on malformed files
            raise ValueError(f"Tokenizer file '{path}' is JSON but not a tokenizer.json that HF "
                             f"tokenizers can load ({e}); give one saved by tokenizers / "
                             f"transformers or ptft, or a BERT vocab.txt.") from None
        # A published tokenizer.json may pad and truncate (all-MiniLM-L6-v2 pads to 128);
        # ptft pads and truncates its batches itself, to data.seq_len.
        tok.no_padding()
        tok.no_truncation()
        return tok
    # Read as HF reads a vocab.txt (line number = id, trailing spaces trimmed, a repeated line
    # takes its last number), so ids match other BERT tooling.
    vocab = models.WordPiece.read_file(str(path)) if text else {}
    if "[UNK]" not in vocab:
        raise ValueError(f"Tokenizer file '{path}' is neither a tokenizer.json (a JSON object) "
                         f"nor a BERT vocab.txt (UTF-8, one token per line, with an [UNK] "
                         f"line). Give one of those in data.tokenizer.")
    return _bert_wordpiece(vocab)


def _bert_wordpiece(vocab: dict[str, int]) -> Tokenizer:
    """The tokenizer BERT (uncased) builds from its vocab.txt: lowercasing normalizer, BERT's
    pre-tokenizer, WordPiece with ## continuations, and [CLS] ... [SEP] around a text."""
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # Marked special as HF's BertWordPieceTokenizer does: kept whole in text, skipped by decode.
    tok.add_special_tokens([t for t in WORDPIECE_SPECIALS if t in vocab])
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                       ("[CLS]", vocab["[CLS]"]))
    return tok


@dataclass(frozen=True)
class TokenIds:
    """The ids the objectives and packing need, read from a tokenizer."""
    vocab_size: int
    special_ids: tuple[int, ...]
    bos_id: int | None  # prepended to each document (BERT's [CLS])
    eos_id: int  # appended to each document ([SEP] or <|endoftext|>)
    mask_id: int | None

    @classmethod
    def of(cls, tok: Tokenizer, kind: str) -> "TokenIds":
        names = WORDPIECE_SPECIALS if kind == "encoder" else BPE_SPECIALS
        ids = {n: tok.token_to_id(n) for n in names}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"The tokenizer lacks the special token(s) {missing} that "
                             f"model.kind {kind} needs; train one with ptft (leave "
                             f"data.tokenizer null).")
        # Every special token (data.extra_special_tokens too) is kept out of MLM masking.
        special = sorted(set(ids.values()) | {i for i, t in tok.get_added_tokens_decoder().items()
                                              if t.special})
        if kind == "encoder":
            return cls(tok.get_vocab_size(), tuple(special), ids["[CLS]"], ids["[SEP]"],
                       ids["[MASK]"])
        return cls(tok.get_vocab_size(), tuple(special), None, ids["<|endoftext|>"], None)


def tokenizer_sha256(path: str | Path) -> str:
    """Identifies a tokenizer by its canonical JSON, not its file: the same tokenizer read from
    a vocab.txt or from the tokenizer.json a run saved has one hash."""
    return hashlib.sha256(load_tokenizer(path).to_str().encode()).hexdigest()


def iter_texts(documents, chunk: int = 10_000):
    """Every text of a sources.Documents, read `chunk` documents at a time."""
    for start in range(0, len(documents), chunk):
        yield from documents.texts(start, start + chunk)


# Beside a tokenizer.json a run directory made: what made it, as the config keys that chose
# it. A run that fails before its first checkpoint leaves the tokenizer behind; the next run
# in that folder, on another corpus say, must not take it on silently.
TOKENIZER_SOURCE = "tokenizer_source.json"


def tokenizer_source(data, kind: str) -> dict:
    """The config keys that make a run's tokenizer (`data` a DataConfig): the file
    data.tokenizer names, or what a tokenizer is trained on."""
    if data.tokenizer:
        return {"data.tokenizer": str(Path(data.tokenizer).resolve())}
    return {"data.corpus": data.corpus, "data.format": data.format,
            "data.text_column": data.text_column, "data.split": data.split,
            "data.tokenizer_vocab_size": data.tokenizer_vocab_size,
            "data.extra_special_tokens": list(data.extra_special_tokens), "model.kind": kind}


def save_tokenizer(tokenizer: Tokenizer, run_dir: Path, source: dict | None) -> None:
    """tokenizer.json into a run directory, with what made it written first (a kill between
    the two leaves a record and no tokenizer, which the next run replaces)."""
    if source is not None:
        atomic_write_json(Path(run_dir) / TOKENIZER_SOURCE, source)
    atomic_write_text(Path(run_dir) / "tokenizer.json", tokenizer.to_str(pretty=True))


def _check_left_behind(saved: Path, source: dict | None) -> None:
    """Refuses a tokenizer an earlier run left in a run directory that has no checkpoint yet,
    when this config would make another one. A run that has saved a step keeps its tokenizer
    whatever the config says (a resume may change the corpus; the vocabulary stays)."""
    record_path = saved.parent / TOKENIZER_SOURCE
    if source is None or not record_path.is_file() or step_folders(saved.parent / "checkpoints"):
        return
    record = read_json(record_path, "the record of what made the run's tokenizer")
    if record == source:
        return
    changes = [f"{key} was {record.get(key)!r}, now {source.get(key)!r}"
               for key in sorted(set(record) | set(source)) if record.get(key) != source.get(key)]
    raise ValueError(f"{saved} was made for another config ({'; '.join(changes)}) and this "
                     f"run_dir has no checkpoint yet. Delete it to make the tokenizer this "
                     f"config asks for, set data.tokenizer={saved} to use it as it is, or use "
                     f"a new run_dir.")


def run_tokenizer_path(data_tokenizer: str | None, run_dir: Path,
                       source: dict | None = None) -> Path | None:
    """The one rule for which tokenizer a run uses: the run directory's tokenizer.json once it
    exists (a run keeps its vocabulary), else data.tokenizer, else None (train one).
    data.tokenizer given for a run that already has a different tokenizer is an error, and so
    is one an earlier run left behind for another config (`source`, tokenizer_source)."""
    saved = Path(run_dir) / "tokenizer.json"
    if saved.exists():
        if data_tokenizer and tokenizer_sha256(data_tokenizer) != tokenizer_sha256(saved):
            raise ValueError(f"data.tokenizer '{data_tokenizer}' differs from the tokenizer this "
                             f"run directory was trained with ({saved}). Use a new run_dir, or "
                             f"drop data.tokenizer to resume.")
        if not data_tokenizer:
            _check_left_behind(saved, source)
        return saved
    return Path(data_tokenizer) if data_tokenizer else None
