"""Real image-text pairs offline: the Noto Color Emoji glyphs, each with its Unicode name,
group and subgroup (`data.corpus: emoji`).

Two Debian packages hold the data: `fonts-noto-color-emoji` (Google's Noto Color Emoji, SIL
Open Font License 1.1) and `unicode-data` (the Unicode Consortium's emoji-test.txt, under the
Unicode licence). Every fully-qualified emoji outside the "Component" group is one example,
skin-tone variants left out (1,870 in Unicode 15.0); its glyph is rendered with Pillow on a
white square, its text is its name ("grinning face", "flag: Japan"), and its labels are its
group ("Smileys & Emotion", 9 of them) and subgroup ("face-smiling", 98). Splits are fixed by
a hash of the code points: about 80% train, 10% validation, 10% test.

A glyph the font cannot draw as one image (a sequence newer than the font, drawn as several
glyphs side by side) is a `BadImage`: counted and skipped with `data.skip_bad_images`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft_jax.data.image_io import BadImage, digest, file_key

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
GLYPH_PX = 109  # the one bitmap size Noto Color Emoji holds
CANVAS = 136  # a glyph is 136 x 128 px; it is centred on a white square of this side
SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
COLUMNS = ("name", "group", "subgroup")
_SKIN_TONES = ("\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF")
INSTALL = "apt install fonts-noto-color-emoji unicode-data"


@dataclass(frozen=True)
class Emoji:
    chars: str
    name: str
    group: str
    subgroup: str

    def field(self, column: str) -> str:
        return getattr(self, column)


def read_emoji_test(path: Path = EMOJI_TEST) -> list[Emoji]:
    """Fully-qualified emoji of emoji-test.txt, without the Component group and without
    skin-tone variants, in the file's order."""
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes, comment = line.split(";", 1)[0], line.split("#", 1)[1].strip()
            chars = "".join(chr(int(c, 16)) for c in codes.split())
            # comment: "😀 E1.0 grinning face"
            name = comment.split(" ", 2)[2] if comment.count(" ") >= 2 else comment
            if group != "Component" and not any(t in chars for t in _SKIN_TONES):
                out.append(Emoji(chars, name, group, subgroup))
    return out


def split_of(emoji: Emoji) -> str:
    bucket = int(hashlib.sha1(emoji.chars.encode("utf-8")).hexdigest(), 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


class EmojiPairs:
    """One split of the emoji pairs: a pair source (see data/pairs.py)."""

    def __init__(self, split: str, text_column: str, label_column: str | None,
                 font: Path = FONT, emoji_test: Path = EMOJI_TEST):
        for path in (font, emoji_test):
            if not path.is_file():
                raise ValueError(f"data.corpus 'emoji' needs {path}: install it with `{INSTALL}`"
                                 f" (Debian / Ubuntu).")
        if split not in SPLITS:
            raise ValueError(f"data.corpus 'emoji' has the splits {', '.join(SPLITS)}; "
                             f"'{split}' is none of them.")
        for key, column in (("data.text_column", text_column),
                            ("data.label_column", label_column)):
            if column is not None and column not in COLUMNS:
                raise ValueError(f"{key} '{column}' is not a column of data.corpus 'emoji' "
                                 f"(its columns: {', '.join(COLUMNS)}).")
        self.font, self.emoji_test, self.split = font, emoji_test, split
        self.text_column, self.label_column = text_column, label_column
        self.name = f"emoji:{split}"
        self.emoji = [e for e in read_emoji_test(emoji_test) if split_of(e) == split]
        self._font = None

    def __len__(self) -> int:
        return len(self.emoji)

    def fingerprint(self) -> str:
        return digest("emoji", self.split, file_key(self.font)[1:], file_key(self.emoji_test)[1:])

    def texts(self) -> list[str]:
        return [e.field(self.text_column) if self.text_column else "" for e in self.emoji]

    def labels(self) -> list:
        return [e.field(self.label_column) if self.label_column else None for e in self.emoji]

    def read(self, start: int, stop: int) -> list:
        from PIL import Image, ImageDraw, ImageFont
        if self._font is None:
            self._font = ImageFont.truetype(str(self.font), GLYPH_PX)
        out = []
        for e in self.emoji[start:stop]:
            canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), e.chars, font=self._font,
                                                     embedded_color=True)
            if right - left > 1.5 * CANVAS:
                out.append(BadImage(f"emoji '{e.name}'", "the font draws it as several glyphs "
                                                         "(a sequence newer than the font)"))
                continue
            draw.text(((CANVAS - (right - left)) / 2 - left, (CANVAS - (bottom - top)) / 2 - top),
                      e.chars, font=self._font, embedded_color=True)
            rgba = np.asarray(canvas, np.uint8)
            if rgba[..., 3].max() == 0:
                out.append(BadImage(f"emoji '{e.name}'", "the font has no glyph for it"))
                continue
            white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
            out.append(np.asarray(Image.alpha_composite(white, canvas).convert("RGB"), np.uint8))
        return out

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_font"} | {"_font": None}
