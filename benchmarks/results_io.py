"""Where every benchmark writes: <name>.jsonl (appended, one row per measurement, with the
machine and the time) and <name>.md (the latest table) under benchmarks/results/<device>/."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from ptft_jax.bench.report import device_slug, environment

RESULTS = Path(__file__).parent / "results"


def write_results(stem: str, rows: list[dict], title: str, table: list[str],
                  **fields) -> None:
    """Appends `rows` (with `fields`, the time and the machine) to <stem>.jsonl and writes
    <stem>.md (`title` naming the machine and time, then `table`), under the machine's
    results folder; prints the Markdown."""
    env = environment()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    out = RESULTS / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, **fields, "time": stamp, **env}) + "\n")
    lines = [f"{title}; {env.get('machine', '')} {env.get('isa', '')}; {stamp}", "", *table]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
