"""Subword tokenizers with HF `tokenizers`: WordPiece for encoders, byte-level BPE for decoders."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<|endoftext|>"]


def train_tokenizer(kind: str, documents: list[str], vocab_size: int) -> Tokenizer:
    """Trains a WordPiece (kind='encoder') or byte-level BPE (kind='decoder') tokenizer.
    Special tokens take the first ids."""
    if kind == "encoder":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                            special_tokens=WORDPIECE_SPECIALS,
                                            show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    if kind == "encoder":
        tok.model = _canonical_wordpiece(tok.get_vocab())
    log.info("trained a %s tokenizer: %d tokens", "WordPiece" if kind == "encoder" else "BPE",
             tok.get_vocab_size())
    return tok


def _canonical_wordpiece(vocab: dict[str, int]) -> models.WordPiece:
    """The WordPiece trainer hands out ids in hash-map order, so two trainings on the same text
    give the same tokens under different ids. Renumber them in a fixed order (special tokens
    first, then by length and text) so that training is reproducible, across processes too."""
    rest = sorted((t for t in vocab if t not in WORDPIECE_SPECIALS), key=lambda t: (len(t), t))
    ordered = {t: i for i, t in enumerate(WORDPIECE_SPECIALS + rest)}
    return models.WordPiece(vocab=ordered, unk_token="[UNK]")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Tokenizer file '{path}' does not exist; give a tokenizer.json, or "
                         f"leave data.tokenizer null to train one on the corpus.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exceptions on malformed files
        raise ValueError(f"Tokenizer file '{path}' could not be read: {e}") from None


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
            raise ValueError(f"The tokenizer lacks the special token(s) {missing} that a "
                             f"{kind} needs; train one with ptft (leave data.tokenizer null).")
        if kind == "encoder":
            return cls(tok.get_vocab_size(), tuple(ids.values()), ids["[CLS]"], ids["[SEP]"],
                       ids["[MASK]"])
        return cls(tok.get_vocab_size(), tuple(ids.values()), None, ids["<|endoftext|>"], None)
