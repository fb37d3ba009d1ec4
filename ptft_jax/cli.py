"""`ptft`: the command line.

    ptft pretrain --config configs/pretrain_tiny_mlm.yaml [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ptft_jax.config import ConfigError, load_config


def _pretrain(args) -> int:
    from ptft_jax.checkpoint import CheckpointMismatch
    from ptft_jax.train import pretrain
    cfg = load_config(args.config, args.overrides)
    try:
        summary = pretrain(cfg)
    except (ConfigError, CheckpointMismatch, ValueError) as e:
        print(f"ptft pretrain: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary['steps']} steps in {summary['run_dir']} | "
          f"loss {summary.get('loss', float('nan')):.4f} | "
          f"step {summary.get('step_time_s', float('nan')) * 1e3:.1f} ms | "
          f"{summary.get('tokens_per_s', 0):,.0f} tokens/s | MFU {summary.get('mfu', 0):.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain a language model (MLM or causal LM)")
    p.add_argument("--config", "-c", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    p.set_defaults(func=_pretrain)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ptft {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
