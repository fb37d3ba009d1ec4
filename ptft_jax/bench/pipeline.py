"""`ptft bench --pipeline`: the input path alone, without a model.

Tokens/s from a memory-mapped token cache to device arrays through the training loader
(Packer + BatchLoader) and its prefetch thread, and the tokenization of `ptft data prepare`
(every core) into the cache.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import jax
import numpy as np

from ptft_jax.bench.benchmark import named_cases, read_cases
from ptft_jax.bench.report import device_slug, environment
from ptft_jax.config.schema import DataConfig, MeshConfig
from ptft_jax.core.mesh import batch_sharding, global_batch_array, make_mesh
from ptft_jax.data.cache_build import prepare_cache
from ptft_jax.data.loader import BatchLoader, prefetch
from ptft_jax.data.opening import open_documents
from ptft_jax.data.packing import Packer
from ptft_jax.data.sources import from_arrays
from ptft_jax.data.tokenizer import iter_texts, train_tokenizer


def run_pipeline_case(case: dict, work_dir: Path, num_tokens: int = 50_000_000,
                      batches: int = 100) -> dict:
    """Tokens/s from a memory-mapped token cache to device arrays, through the training
    loader (Packer + BatchLoader) and its prefetch thread. Documents have geometric lengths
    (mean 600 tokens); the token file is written once and reused."""

    rng = np.random.default_rng(0)
    lengths = rng.geometric(1 / 600, size=num_tokens // 600)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path = work_dir / f"pipeline_tokens_{num_tokens}.bin"
    if not path.exists() or path.stat().st_size != 2 * int(offsets[-1]):
        out = np.memmap(path, np.uint16, "w+", shape=(int(offsets[-1]),))
        out[:] = rng.integers(5, 30_000, len(out), dtype=np.uint16)
        out.flush()
        del out
    tokens = np.memmap(path, np.uint16, "r")
    seq_len, global_batch = case["seq_len"], case["global_batch"]
    packer = Packer(tokens, offsets, seq_len, 2, 3, case.get("packing", "pack"))
    sharding = batch_sharding(make_mesh(MeshConfig()))
    loader = BatchLoader(packer, global_batch, 0, slice(0, global_batch))

    t0 = time.perf_counter()
    for step in range(batches):
        loader.batch(step)
    host_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = prefetch(global_batch_array(loader.batch(step), sharding, global_batch)
                      for step in range(batches))
    for batch in stream:
        jax.block_until_ready(batch)
    device_s = time.perf_counter() - t0
    tokens_moved = batches * global_batch * seq_len
    return {"case": case["name"], **case, "batches": batches,
            "host_tokens_per_s": tokens_moved / host_s,
            "to_device_tokens_per_s": tokens_moved / device_s}


def run_tokenization_case(work_dir: Path, copies: int = 10) -> dict:
    """Documents/s and tokens/s of `ptft data prepare` (the cache build, every core) on the
    bundled corpus repeated `copies` times, with a WordPiece tokenizer of 8192 trained on it."""
    import shutil


    kjv = open_documents_bundled()
    tokenizer_path = work_dir / "tokenization_tokenizer.json"
    train_tokenizer("encoder", iter_texts(kjv), 8192).save(str(tokenizer_path))
    texts = kjv.texts(0, len(kjv)) * copies
    cache_dir = work_dir / "tokenization_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = prepare_cache(from_arrays(texts, name=f"kjv x{copies}"), tokenizer_path, cache_dir,
                          shard_docs=2_000, progress=False)
    stats = cache.stats
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"case": f"tokenize-kjv-x{copies}", "documents": stats.docs,
            "tokens": stats.tokens, "workers": stats.workers,
            "docs_per_s": stats.docs_per_s, "tokens_per_s": stats.tokens_per_s}


def open_documents_bundled():
    return open_documents(DataConfig(corpus="bundled:kjv"))


def run_pipeline(names: list[str], cases_file: Path, out_dir: Path, echo=print) -> list[dict]:
    doc = read_cases(cases_file)
    cases = named_cases(doc.get("pipeline", []), names, "pipeline", cases_file,
                        required=("seq_len", "global_batch"))
    env = environment()
    out = out_dir / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    tokenization = {**run_tokenization_case(out_dir), **env}
    echo(f"[{tokenization['case']}] {tokenization['docs_per_s']:,.0f} documents/s, "
         f"{tokenization['tokens_per_s'] / 1e6:.2f}M tokens/s on {tokenization['workers']} "
         f"worker(s)")
    rows = []
    for case in cases:
        row = {**run_pipeline_case(case, out_dir), **env}
        rows.append(row)
        echo(f"[{row['case']}] host {row['host_tokens_per_s'] / 1e6:.1f}M tokens/s, to device "
             f"{row['to_device_tokens_per_s'] / 1e6:.1f}M tokens/s")
    lines = ["| pipeline case | seq | batch | packing | host tokens/s | to device tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['seq_len']} | {r['global_batch']} | {r.get('packing')} | "
              f"{r['host_tokens_per_s'] / 1e6:.1f}M | {r['to_device_tokens_per_s'] / 1e6:.1f}M |"
              for r in rows]
    table = (f"Input pipeline on {env['machine']}, {env['isa']} ({env['device_kind']} "
             f"x{env['device_count']}),"
             f" commit {env['git_commit']}, {env['time']}\n\n" + "\n".join(lines) + "\n\n"
             f"Tokenization into the cache ({tokenization['case']}, "
             f"{tokenization['documents']:,} documents, {tokenization['workers']} worker(s)): "
             f"{tokenization['docs_per_s']:,.0f} documents/s, "
             f"{tokenization['tokens_per_s'] / 1e6:.2f}M tokens/s\n")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"pipeline-{stamp}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [tokenization, *rows]))
    (out / "pipeline-latest.md").write_text(table)
    echo(table)
    return rows
