"""What checkpoint checksums cost, at a size users train: the train state of a BERT-base MLM
(vocabulary 30522; params plus AdamW's two moments), on this machine's devices.

    python -m benchmarks.checkpoint_integrity [--preset bert-base] [--repeats 3]

Times, each the median of --repeats after one untimed call: the on-device checksums of the
whole state (what every save adds), a synchronous Orbax save of the same state, and a restore
with the checksums verified (what a resume adds). Writes
benchmarks/results/<device>/checkpoint-latest.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from ptft_jax.bench.report import device_slug, environment
from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.config.load import load_config
from ptft_jax.tasks.factory import make_task
from ptft_jax.tasks.lm import MlmSpec
from ptft_jax.train.engine import build

RESULTS = Path(__file__).resolve().parent / "results"


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compiles / warms the file cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(None, [f"model.preset={args.preset}", "model.vocab_size=30522",
                             "data.seq_len=128", "train.global_batch=8"])
    spec = MlmSpec(mask_id=4, special_ids=(0, 1, 2, 3, 4), random_low=5, random_high=30522)
    engine = build(cfg, make_task(cfg, mlm=spec))
    state = engine.init(jax.random.key(0))
    arrays = {"params": state.params, "opt_state": state.opt_state}
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(arrays))

    checksum_s = _median_seconds(lambda: {k: integrity.checksums(v) for k, v in arrays.items()},
                                 args.repeats)
    folder = Path(tempfile.mkdtemp(prefix="ptft-ckpt-bench-"))
    try:
        ckpt = Checkpointer(folder, keep=1, async_save=False)
        saves = iter(range(1, 10_000))
        save_s = _median_seconds(lambda: ckpt.save(next(saves), state, {}), args.repeats)
        step = ckpt.latest_step()
        target = engine.restore_target()
        restore_s = _median_seconds(lambda: jax.block_until_ready(ckpt.restore(step, target)[0]),
                                    args.repeats)
        verify_s = _median_seconds(lambda: [integrity.compare(
            ckpt.read_meta(step)["checksums"][k], v, k) for k, v in arrays.items()],
            args.repeats)
        ckpt.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    env = environment()
    out = RESULTS / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    table = (
        f"Checkpoint checksums on {env['machine']}, {env['isa']} ({env['platform']} "
        f"x{env['device_count']}), jax {env['jax']}, commit {env['git_commit']}, {env['time']}\n\n"
        f"State: {args.preset} MLM, vocabulary 30522, params + AdamW moments, "
        f"{n_bytes / 1e6:,.0f} MB in {len(jax.tree.leaves(arrays))} arrays, float32. "
        f"Median of {args.repeats} after one untimed call.\n\n"
        f"| what | seconds | share of a save |\n|---|---|---|\n"
        f"| checksums of the whole state (on device) | {checksum_s:.3f} | "
        f"{checksum_s / save_s:.1%} |\n"
        f"| synchronous save, checksums included | {save_s:.3f} | 100% |\n"
        f"| restore, checksums verified | {restore_s:.3f} | |\n"
        f"| of which verifying (checksums + compare) | {verify_s:.3f} | |\n")
    (out / "checkpoint-latest.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
