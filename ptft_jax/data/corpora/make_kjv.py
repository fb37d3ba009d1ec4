"""Rebuild kjv.txt.gz from Debian's `bible-kjv` package (see README.md beside this file).

Usage: apt-get install bible-kjv && python make_kjv.py
Writes one document per line: each chapter's verses joined, verse numbers dropped.
"""
import gzip
import re
import subprocess
from pathlib import Path

raw = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
chapters: list[str] = []
verses: list[str] = []
for line in raw.splitlines():
    if re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", line.strip()):  # a "Genesis 1" header
        if verses:
            chapters.append(" ".join(verses))
        verses = []
    elif line.strip():
        text = re.sub(r"^\s+\d+ ", "", line) if re.match(r"^\s+\d+ ", line) else line.strip()
        if re.match(r"^\s+\d+ ", line) or not verses:
            verses.append(text.strip())
        else:  # a wrapped continuation of the previous verse
            verses[-1] += " " + text.strip()
if verses:
    chapters.append(" ".join(verses))
out = Path(__file__).with_name("kjv.txt.gz")
with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
    f.write("\n".join(chapters) + "\n")
print(f"{len(chapters)} chapters -> {out}")
