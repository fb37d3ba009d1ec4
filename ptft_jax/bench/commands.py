"""`ptft bench` as a command (cli.py parses its arguments): the step benchmarks, or the input
pipeline's (--pipeline) or the finetuning strategies' (--finetune)."""
from __future__ import annotations

import os
from pathlib import Path

from ptft_jax.bench import benchmark, report
from ptft_jax.bench import finetune as bench_finetune
from ptft_jax.bench import pipeline as bench_pipeline
from ptft_jax.config.schema import ConfigError


def bench(args) -> int:
    if args.steps < 1 or args.warmup < 0 or (args.torch_steps is not None and
                                             args.torch_steps < 1):
        raise ValueError("--steps and --torch-steps must be at least 1, --warmup at least 0.")
    if args.fake_cpu_devices:  # read when JAX starts its backend: before anything runs
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.fake_cpu_devices}").strip()
    cases = Path(args.cases_file) if args.cases_file else benchmark.DEFAULT_CASES
    out = Path(args.out) if args.out else report.default_results_dir()
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():  # found before any case runs, not when the results are written
        raise ConfigError(f"--out {args.out} is a file; give a folder." if existing == out else
                          f"--out {args.out}: {existing} is a file; give a folder.")
    if args.pipeline:
        bench_pipeline.run_pipeline(args.cases or [], cases, out)
    elif args.finetune:
        bench_finetune.run(args.cases or [], cases, out, args.steps, args.warmup,
                           with_torch=not args.no_torch, profile=args.profile)
    else:
        benchmark.run(args.cases or [], args.set or [], args.steps, args.warmup, args.profile,
                      cases, out, torch_steps=args.torch_steps, with_torch=not args.no_torch)
    return 0
