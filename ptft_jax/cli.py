"""`ptft`: the command line.

    ptft pretrain --config configs/pretrain_tiny_mlm.yaml [key.sub=value ...]
    ptft bench --set cpu [--cases NAME ...] [--steps N] [--profile]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ptft_jax.config import ConfigError, load_config


def _repo_file(relative: str):
    from pathlib import Path
    return Path(__file__).resolve().parents[1] / relative


def _pretrain(args) -> int:
    from ptft_jax.checkpoint import CheckpointMismatch
    from ptft_jax.train import pretrain
    cfg = load_config(args.config, args.overrides)
    try:
        summary = pretrain(cfg)
    except (ConfigError, CheckpointMismatch, ValueError) as e:
        print(f"ptft pretrain: error: {e}", file=sys.stderr)
        return 2
    if summary.get("stopped_by_signal"):
        return 130
    print(f"done: {summary['steps']} steps in {summary['run_dir']} | "
          f"loss {summary.get('loss', float('nan')):.4f} | "
          f"step {summary.get('step_time_s', float('nan')) * 1e3:.1f} ms | "
          f"{summary.get('tokens_per_s', 0):,.0f} tokens/s | MFU {summary.get('mfu', 0):.1%}")
    return 0


def _bench(args) -> int:
    if args.fake_cpu_devices:  # must happen before JAX initialises
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.fake_cpu_devices}").strip()
    from pathlib import Path

    from ptft_jax import benchmark
    if args.pipeline:
        benchmark.run_pipeline(args.cases or [], Path(args.cases_file), Path(args.out))
        return 0
    benchmark.run(args.cases or [], args.set or [], args.steps, args.warmup, args.profile,
                  Path(args.cases_file), Path(args.out), torch_steps=args.torch_steps,
                  with_torch=not args.no_torch)
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
    b = sub.add_parser("bench", help="benchmark step time, throughput, MFU, compile time and "
                                     "memory, beside a PyTorch reference")
    b.add_argument("--set", action="append", help="a set of cases in the cases file "
                                                  "(cpu, memory, accelerator); repeatable")
    b.add_argument("--cases", nargs="+", help="case names to run")
    b.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    b.add_argument("--torch-steps", type=int, help="timed steps for PyTorch (default --steps)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--profile", action="store_true", help="write a jax.profiler trace per case")
    b.add_argument("--pipeline", action="store_true",
                   help="benchmark the input pipeline alone (the cases file's pipeline list)")
    b.add_argument("--fake-cpu-devices", type=int, default=0,
                   help="on a CPU, fake this many devices (for the memory set: 8)")
    b.add_argument("--cases-file", default=str(_repo_file("benchmarks/cases.yaml")))
    b.add_argument("--out", default=str(_repo_file("benchmarks/results")),
                   help="results folder (one subfolder per device)")
    b.set_defaults(func=_bench)
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
