"""`ptft pretrain` and `ptft finetune` as commands (cli.py parses their arguments): run the
job, then one summary line, and the exit code (0 done, 2 bad input, 3 diverged, 4 a failed
save, 130 stopped by a signal)."""
from __future__ import annotations

import sys

from ptft_jax.ckpt.checkpoint import CheckpointMismatch, CheckpointSaveFailed
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.jobs.entry import train as train_job


def summary_line(summary: dict) -> str:
    line = (f"done: {summary['steps']} steps in {summary['run_dir']} | "
            f"loss {summary.get('loss', float('nan')):.4f} | "
            f"step {summary.get('step_time_s', float('nan')) * 1e3:.1f} ms | "
            + (f"{summary['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in summary else
               f"{summary.get('examples_per_s', 0):,.0f} examples/s"))
    if "mfu" in summary:
        line += f" | MFU {summary['mfu']:.1%}" + (
            " (above 100%: the measured ceiling was too low)"
            if summary.get("mfu_ceiling_too_low") else "")
    if summary.get("pruned") is not None:
        line += f" | pruned {summary['pruned']:.1%} of finetune.prune_targets"
    if summary.get("metric"):
        line += (f" | eval {summary['metric']} {summary.get('eval/' + summary['metric'], 0):.4f}"
                 f" (best {summary['best']:.4f} at step {summary['best_step']})")
    return line


def train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        summary = train_job(args.command, cfg)
    except (ConfigError, CheckpointMismatch, ValueError) as e:
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveFailed as e:
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 4
    if summary.get("stopped_by_signal"):
        return 130
    if summary.get("diverged"):
        kept = summary["last_saved_step"]
        print(f"ptft {args.command}: error: {summary['stop_reason']}; "
              + (f"the last checkpoint, step {kept}, is intact." if kept else
                 "no checkpoint was saved."), file=sys.stderr)
        return 3
    print(summary_line(summary))
    return 0
