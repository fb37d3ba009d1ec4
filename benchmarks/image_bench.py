"""Image training steps: ptft's ViT and ResNet against PyTorch at the same shapes, in one run.

    python -m benchmarks.image_bench [--cases NAME ...] [--steps 5] [--warmup 2] [--no-compile]

Each case is a full training step of image classification (the step `ptft pretrain` runs:
uint8 images in, flip augmentation and normalisation on device, label-smoothed
cross-entropy, AdamW with clipping), compile time apart, median of synchronised steps.
PyTorch runs the same architecture from `transformers` (ViTForImageClassification; for
ResNet-50, transformers' ResNetForImageClassification: torchvision's PyPI wheel is built
against CUDA PyTorch and does not load with the CPU build used here), eager and
torch.compile, on float images normalised on the host (its augmentation is not timed).
MFU counts the analytic FLOPs of `perf.image_train_flops` against the measured dense-matmul
ceiling (CPU) or the datasheet peak (GPU).
Writes benchmarks/results/<device>/image-bench.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from ptft_jax import perf
from ptft_jax.benchmark import device_slug, environment, matmul_ceiling, timed_steps
from ptft_jax.config import load_config
from ptft_jax.engine import build
from ptft_jax.models.layers import dtypes
from ptft_jax.tasks.image import ImageClassifyTask
from ptft_jax.validation import validate

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 1000

# name -> (overrides, global batch). CPU-sized unless the name says otherwise.
CASES = {
    "vit-b16-224": (["model.preset=vit-b16"], 8),
    "resnet50-224": (["model.preset=resnet50"], 8),
    "vit-mini4-28": (["model.preset=vit-mini4", "model.image_size=28"], 128),
    "resnet18-small-w16-28": (["model.preset=resnet18-small", "model.resnet_width=16",
                               "model.image_size=28"], 128),
}


def jax_case(name: str, steps: int, warmup: int) -> dict:
    overrides, batch = CASES[name]
    cfg = load_config(None, [*overrides, f"train.global_batch={batch}", "mesh.data=-1",
                             "augment.flip=true", "optim.warmup_steps=1"])
    validate(cfg, jax.device_count())
    names = [str(i) for i in range(NUM_CLASSES)]
    engine = build(cfg, ImageClassifyTask(cfg.model, names, cfg.augment, 0.1))
    key = jax.random.key(0)
    state = engine.init(key)
    rng = np.random.default_rng(0)
    s, c = cfg.model.image_size, cfg.model.channels
    host = [{"image": rng.integers(0, 256, (batch, s, s, c), dtype=np.uint8),
             "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
             "weight": np.ones(batch, np.float32)} for _ in range(2)]
    batches = [engine.to_device(b) for b in host]
    t0 = time.perf_counter()
    compiled = engine.step_fn.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state, times = timed_steps(compiled, state, batches, key, warmup, steps)
    median = statistics.median(times)
    flops = perf.image_train_flops(cfg.model, NUM_CLASSES)
    compute_dtype, _ = dtypes(cfg.model)
    peak = perf.device_peak_flops()
    ceiling = peak * jax.device_count() if peak else matmul_ceiling(np.dtype(compute_dtype))
    images_per_s = batch / median
    row = {"case": name, "framework": "ptft", "global_batch": batch, "image_size": s,
           "compile_s": compile_s, "step_ms_median": median * 1e3, "images_per_s": images_per_s,
           "train_gflops_per_image": flops / 1e9, "mfu": images_per_s * flops / ceiling,
           "mfu_reference": "datasheet peak" if peak else "measured matmul ceiling",
           "compute_dtype": str(compute_dtype)}
    if memory is not None:
        row["mem_temporaries_bytes"] = memory.temp_size_in_bytes
    return row, cfg, host


def torch_case(name: str, cfg, host: list[dict], compiled: bool, steps: int,
               warmup: int) -> dict:
    import torch
    import transformers as tr
    torch.manual_seed(0)
    m = cfg.model
    if m.kind == "vit":
        model = tr.ViTForImageClassification(tr.ViTConfig(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
            image_size=m.image_size, patch_size=m.patch_size, num_channels=m.channels,
            num_labels=NUM_CLASSES, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
    else:
        bottleneck = m.resnet_block == "bottleneck"
        widths = [m.resnet_width * 2 ** i * (4 if bottleneck else 1)
                  for i in range(len(m.resnet_stages))]
        model = tr.ResNetForImageClassification(tr.ResNetConfig(
            num_channels=m.channels, embedding_size=m.resnet_width, hidden_sizes=widths,
            depths=list(m.resnet_stages), layer_type="bottleneck" if bottleneck else "basic",
            num_labels=NUM_CLASSES, downsample_in_first_stage=False))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model
    batches = [(torch.tensor(((b["image"] / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2),
                             dtype=torch.float32), torch.tensor(b["label"], dtype=torch.long))
               for b in host]

    def step(batch):
        pixels, labels = batch
        logits = forward(pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step(batches[0])
    first = time.perf_counter() - t0
    for i in range(warmup):
        step(batches[i % 2])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % 2])
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    batch = len(host[0]["label"])
    return {"case": name, "framework": "torch.compile" if compiled else "torch eager",
            "global_batch": batch, "image_size": m.image_size, "first_step_s": first,
            "step_ms_median": median * 1e3, "images_per_s": batch / median}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    env = environment()
    out = REPO / "benchmarks" / "results" / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        row, cfg, host = jax_case(name, args.steps, args.warmup)
        rows.append(row)
        print(json.dumps(row), flush=True)
        # transformers' ResNet has the ImageNet stem only: no reference for the small stem.
        same_arch = not (cfg.model.kind == "resnet" and cfg.model.resnet_stem == "small")
        if not args.no_torch and same_arch:
            for compiled in ([False] if args.no_compile else [False, True]):
                ref = torch_case(name, cfg, host, compiled, args.steps, args.warmup)
                ref["ptft_step_ratio"] = row["step_ms_median"] / ref["step_ms_median"]
                rows.append(ref)
                print(json.dumps(ref), flush=True)
    with open(out / "image-bench.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")
    lines = ["# Image classification training steps", "",
             f"Machine: {env['machine']} ({env['isa']}), {env['device_count']} "
             f"{env['platform']} device(s); jax {env['jax']}"
             + (f", torch {env['torch']}, transformers {env.get('transformers')}"
                if "torch" in env else "") + f"; commit {env['git_commit']}; {env['time']}.",
             "ptft/torch: ptft's median step time over PyTorch's (below 1: ptft is faster).",
             "", "| case | framework | batch | step ms | images/s | compile / first step s "
             "| MFU | ptft/torch |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['framework']} | {r['global_batch']} | "
                     f"{r['step_ms_median']:.0f} | {r['images_per_s']:.1f} | "
                     f"{r.get('compile_s', r.get('first_step_s', 0)):.1f} | "
                     + (f"{r['mfu']:.1%}" if "mfu" in r else "") + " | "
                     + (f"{r['ptft_step_ratio']:.2f}" if "ptft_step_ratio" in r else "") + " |")
    (out / "image-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
