"""Builds fortunes-train.jsonl.gz and fortunes-validation.jsonl.gz from Debian's `fortunes`
package (apt-get install fortunes): a labelled text set for finetuning examples and tests.

The task: predict which fortune file (category) a fortune comes from. Fortunes are separated by
lines holding a single '%'; whitespace is collapsed, empty, duplicate and long (> 600
characters) ones are dropped, and each category is split 85/15 with a fixed seed. Also
fortunes-text.txt.gz: unlabelled in-domain text for (continued) pretraining, one fortune per
line from every file of the package (the ten categories and the 32 others, ascii-art aside),
deduplicated, with every validation fortune left out so that pretraining never sees the texts
a finetuned model is scored on. Gzip with mtime 0, so a rebuild is byte-identical.

    python ptft_jax/data/corpora/make_fortunes.py [/usr/share/games/fortunes]
"""
import gzip
import json
import random
import sys
from pathlib import Path

CATEGORIES = ("computers", "definitions", "food", "law", "politics", "science", "songs-poems",
              "sports", "startrek", "work")
MAX_CHARS = 600
VALIDATION = 0.15
NOT_PROSE = ("ascii-art",)


def write_gzip(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                filename="") as f:
        f.write(data)


def read(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    fortunes = (" ".join(block.split()) for block in text.split("\n%\n"))
    return [f for f in fortunes if f and f != "%" and len(f) <= MAX_CHARS]


def main(source: str = "/usr/share/games/fortunes") -> None:
    out_dir = Path(__file__).parent
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "validation": []}
    for category in CATEGORIES:
        texts = [t for t in read(Path(source) / category) if not (t in seen or seen.add(t))]
        random.Random(f"fortunes/{category}").shuffle(texts)
        n_val = round(len(texts) * VALIDATION)
        splits["validation"] += [{"text": t, "label": category} for t in texts[:n_val]]
        splits["train"] += [{"text": t, "label": category} for t in texts[n_val:]]
        print(f"{category:12s} train {len(texts) - n_val:5d}  validation {n_val:4d}")
    for name, rows in splits.items():
        random.Random(f"fortunes/{name}").shuffle(rows)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path = out_dir / f"fortunes-{name}.jsonl.gz"
        write_gzip(path, data)
        print(f"{path.name}: {len(rows)} examples, {path.stat().st_size:,} bytes")
    held_out = {row["text"] for row in splits["validation"]}
    text, kept = [], set()
    for path in sorted(Path(source).iterdir()):
        if path.suffix in (".dat", ".u8") or path.name in NOT_PROSE or not path.is_file():
            continue
        text += [t for t in read(path) if t not in held_out and not (t in kept or kept.add(t))]
    path = out_dir / "fortunes-text.txt.gz"
    write_gzip(path, "".join(t + "\n" for t in text).encode())
    print(f"{path.name}: {len(text)} fortunes, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
