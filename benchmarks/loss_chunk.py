"""How to chunk the vocabulary loss: step time at chunk sizes x vocabularies, and the memory
the chunks save at gpt2-small.

    python -m benchmarks.loss_chunk [--steps 5] [--vocabs 8192 30522 50257]

Each row is a full training step (`ptft bench`'s measurement: packed rows, compile apart,
median of synchronised steps) of a causal LM (gpt-mini at sequence 256) and a masked LM
(bert-mini at 128, logits at its masked slots only), with `objective.loss_chunk` set to a
number of tokens per device (0: no chunking). The memory table compiles a gpt2-small step
(sequence 1024, batch 16, bf16 compute) from shapes and reads XLA's memory analysis of the
temporaries; on a CPU this is the CPU compiler's plan, not a GPU's.
Writes benchmarks/results/<device>/loss-chunk-<time>.{md,jsonl} and loss-chunk-latest.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import jax

from ptft_jax.bench import benchmark, report
from ptft_jax.tasks.factory import make_task
from ptft_jax.tasks.lm import MlmSpec
from ptft_jax.tasks.vocab_loss import positions_per_chunk
from ptft_jax.train.engine import build

CASES = {"clm": "gpt-mini-clm-s256", "mlm": "bert-mini-mlm-s128"}


def step_rows(vocabs, chunks, steps: int, batch: int | None = None, objectives=tuple(CASES),
              echo=print) -> list[dict]:
    rows = []
    for objective in objectives:
        name = CASES[objective]
        base = benchmark.load_cases(benchmark.DEFAULT_CASES, [], [name])[0]
        if batch:
            base = dataclasses.replace(base, global_batch=batch)
        for vocab in vocabs:
            for chunk in chunks:
                case = dataclasses.replace(base, vocab_size=vocab, loss_chunk=chunk)
                result, _ = benchmark.run_jax_case(case, steps=steps, warmup=1,
                                                   profile_dir=None)
                row = {"case": f"{name}-b{base.global_batch}", "objective": objective,
                       "vocab_size": vocab, "global_batch": base.global_batch,
                       "chunks": num_chunks(objective, base.global_batch, base.seq_len, chunk),
                       "loss_chunk": chunk, "step_ms_median": result["step_ms_median"],
                       "step_ms_min": result["step_ms_min"],
                       "mem_temporaries_bytes": result.get("mem_temporaries_bytes")}
                echo(f"[{name} vocab {vocab} chunk {chunk}] {row['step_ms_median']:.0f} ms")
                rows.append(row)
    return rows


def num_chunks(objective: str, rows: int, seq_len: int, chunk: int) -> int:
    """How many chunks the loss of one device's rows is cut into (masked LM: its slots)."""
    spec = MlmSpec(mask_id=4, special_ids=benchmark.SPECIAL_IDS, random_low=5, random_high=6)
    length = spec.num_slots(seq_len) if objective == "mlm" else seq_len
    return length // positions_per_chunk(rows, length, chunk)


def memory_rows(chunks, echo=print) -> list[dict]:
    base = benchmark.load_cases(benchmark.DEFAULT_CASES, [], ["gpt2-small-clm-s1024"])[0]
    rows = []
    for chunk in chunks:
        cfg = dataclasses.replace(base, loss_chunk=chunk, dtype="bfloat16").config()
        engine = build(cfg, make_task(cfg))
        key = jax.random.key(0)
        batch = engine.to_device(benchmark.synthetic_batches(cfg, n=1)[0])
        state = engine.restore_target()  # shapes and shardings only: nothing allocated
        memory = engine.step_fn.lower(state, batch, key).compile().memory_analysis()
        rows.append({"case": "gpt2-small-clm-s1024-b16-bf16", "loss_chunk": chunk,
                     "mem_temporaries_bytes": memory.temp_size_in_bytes})
        echo(f"[gpt2-small chunk {chunk}] temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB")
    return rows


def table(steps: list[dict], memory: list[dict], env: dict) -> str:
    lines = [f"Loss chunking on {env['machine']}, {env['isa']} ({env['device_kind']} "
             f"x{env['device_count']}); jax {env['jax']}; commit {env['git_commit']}; "
             f"{env['time']}", "",
             "Step time (ms, median) by `objective.loss_chunk` (tokens per device; 0 = off), "
             "with the ratio to no chunking and the number of chunks the loss was cut into. "
             "Cells with 1 chunk run the same program as 0: their spread is run-to-run noise.",
             ""]
    chunks = sorted({r["loss_chunk"] for r in steps})
    lines += ["| case | vocab | " + " | ".join(str(c) for c in chunks) + " |",
              "|---|---|" + "---|" * len(chunks)]
    for (name, vocab) in dict.fromkeys((r["case"], r["vocab_size"]) for r in steps):
        by = {r["loss_chunk"]: r for r in steps if r["case"] == name and r["vocab_size"] == vocab}
        off = by[0]["step_ms_median"] if 0 in by else None
        cells = [f"{by[c]['step_ms_median']:.0f}" +
                 (f" ({by[c]['step_ms_median'] / off:.2f}, {by[c]['chunks']} chunk"
                  f"{'s' if by[c]['chunks'] > 1 else ''})" if off and c else "")
                 for c in chunks]
        lines.append(f"| {name} | {vocab} | " + " | ".join(cells) + " |")
    if memory:
        lines += ["", "Temporaries of a gpt2-small step (sequence 1024, batch 16, bf16 compute; "
                  "XLA memory analysis of the compiled step on this backend):", "",
                  "| loss_chunk | temporaries GiB |", "|---|---|"]
        lines += [f"| {r['loss_chunk']} | {r['mem_temporaries_bytes'] / 2**30:.2f} |"
                  for r in memory]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 30522, 50257])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 1024, 2048, 4096])
    parser.add_argument("--memory-chunks", type=int, nargs="*", default=[0, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: "
                        "the case's)")
    parser.add_argument("--objectives", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(report.default_results_dir()))
    args = parser.parse_args(argv)
    env = report.environment()
    steps = step_rows(args.vocabs, args.chunks, args.steps, args.batch, args.objectives)
    memory = memory_rows(args.memory_chunks) if args.memory_chunks else []
    out = Path(args.out) / report.device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"loss-chunk-{stamp}.jsonl").write_text(
        "".join(json.dumps({**r, **env}) + "\n" for r in steps + memory))
    text = table(steps, memory, env)
    (out / f"loss-chunk-{stamp}.md").write_text(text)
    (out / "loss-chunk-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
