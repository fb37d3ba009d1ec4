"""`ptft checkpoints verify` as a command (cli.py parses its arguments): every step of a run
directory read back and checked, as a table; exit code 1 if one is damaged."""
from __future__ import annotations

from pathlib import Path

from ptft_jax.ckpt.integrity import verify_run, verify_step


def verify(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder; give a ptft run directory.")
    if (run_dir / "meta").is_dir() or (run_dir / "params").is_dir():  # one step folder
        rows = [verify_step(run_dir, run_dir.parent.name)]
    elif run_dir.name in ("checkpoints", "best"):  # one of a run's folders: the whole run
        rows = verify_run(run_dir.parent)
    else:
        rows = verify_run(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} holds no checkpoint (no checkpoints/ or best/ step "
                         f"folders).")
    print(f"{'folder':<20} {'step':>8} {'arrays':>7} {'MB':>9}  status")
    for r in rows:
        print(f"{r['folder']:<20} {r['step']:>8} {r['arrays']:>7} {r['bytes'] / 1e6:>9.2f}  "
              f"{r['status']}")
    count = {kind: sum(r["status"].startswith(kind) for r in rows)
             for kind in ("ok", "DAMAGED", "moved aside")}
    print(f"{count['ok']} step(s) intact, {count['DAMAGED']} damaged, {count['moved aside']} "
          f"moved aside earlier"
          + (". A resume moves damaged steps to checkpoints_damaged/ and falls back to the "
             "newest intact one." if count["DAMAGED"] else "."))
    return 1 if count["DAMAGED"] else 0
