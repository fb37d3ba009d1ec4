"""Masked-LM pretraining from random initialisation: ptft against transformers'
BertForMaskedLM, same tokenizer, same packed rows, same schedule, three seeds each.

    python -m benchmarks.mlm_parity [--presets bert-tiny bert-mini] [--seeds 0 1 2]

The recipe is the README's main job (configs/pretrain_tiny_mlm.yaml): the bundled KJV corpus,
ptft's 8,192-token WordPiece tokenizer trained on it, rows of 128 tokens packed end to end,
batch 32, 300 steps, AdamW at 1e-3 with 30 warm-up steps then cosine to 0.1x, weight decay
0.01 on kernels, clipping at 1.0, dropout off. 256 packed rows are held out; each seed draws
the initial weights and the order of the other rows, and both frameworks train on the same
batches. Each masks as its own library does: ptft in its jitted step (15% of the eligible
tokens, 80/10/10), the reference by transformers' DataCollatorForLanguageModeling (15%,
80/10/10, special tokens never). Both read packed rows through a block-diagonal document mask
with positions restarting per document.

Held-out MLM loss: the held-out rows masked once (the collator, seed 1234), the mean
cross-entropy over their masked tokens, computed by the same PyTorch code for both models:
ptft's parameters go through its HF export (`export_tensors`) into a BertForMaskedLM.
Writes benchmarks/results/<device>/mlm-parity.{jsonl,md,png}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain_tiny_mlm.yaml"
HELD_OUT = 256
EVAL_EVERY = 50


def prepare(preset: str, data_dir: Path, steps: int | None = None):
    """(config, job) of the main job at `preset`: the tokenizer and the token cache are
    built once in `data_dir` and shared by every run."""
    from ptft_jax.config.load import load_config
    from ptft_jax.jobs.lm import pretrain_job
    cfg = load_config(str(CONFIG), [f"model.preset={preset}", "model.vocab_size=null",
                                    "model.max_len=128", "model.dropout=0.0",
                                    "model.dtype=float32", f"run_dir={data_dir}",
                                    "mesh.data=-1", "train.progress=false"]
                     + ([f"train.steps={steps}"] if steps else []))
    job = pretrain_job(cfg)
    job.save_files()
    return job.cfg, job


def splits(num_rows: int, seed: int, steps: int, batch: int):
    """(held-out row ids, the training batches of `seed`)."""
    order = np.random.default_rng(0).permutation(num_rows)
    held, pool = order[:HELD_OUT], order[HELD_OUT:]
    rng, batches = np.random.default_rng(1000 + seed), []
    while len(batches) < steps:
        perm = rng.permutation(pool)
        batches += [perm[i:i + batch] for i in range(0, len(perm) - batch + 1, batch)]
    return held, batches[:steps]


# ---------------------------------------------------------------------------------------------
# The PyTorch side: the reference model, the collator, the shared held-out evaluation


def hf_config(cfg):
    import transformers
    m = cfg.model
    return transformers.BertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
        max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12 if m.norm_eps is None else m.norm_eps)  # ptft: None is BERT's


def collator(run_dir: Path):
    import transformers
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(run_dir / "tokenizer.json"), unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)


def torch_inputs(rows: dict, mask, special_ids) -> dict:
    """A batch of packed rows, masked by the collator, as BertForMaskedLM's keyword arguments."""
    import torch
    ids = torch.as_tensor(rows["tokens"], dtype=torch.long)
    special = torch.isin(ids, torch.as_tensor(special_ids))
    inputs, labels = mask.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
    seg = torch.as_tensor(rows["segment_ids"])
    attention = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]
    return {"input_ids": inputs, "labels": labels, "attention_mask": attention,
            "position_ids": torch.as_tensor(rows["positions"], dtype=torch.long)}


def held_out_loss(model, batches: list[dict]) -> float:
    import torch
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            chosen = b["labels"] != -100
            total += float(torch.nn.functional.cross_entropy(
                logits[chosen], b["labels"][chosen], reduction="sum"))
            count += int(chosen.sum())
    model.train()
    return total / count


def ptft_as_bert(cfg, params):
    """ptft's parameters in a BertForMaskedLM, through ptft's own HF export."""
    import torch
    import transformers

    from ptft_jax.convert.hf_weights import export_tensors
    from ptft_jax.core.params import flatten, unstack_layers
    flat = {p: np.asarray(v) for p, v in flatten(unstack_layers(params)).items()}
    tensors = export_tensors(flat, "bert", cfg.model.num_layers)
    model = transformers.BertForMaskedLM(hf_config(cfg))
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(np.array(v)) for k, v in tensors.items()}, strict=False)
    # The decoder is tied to the token embeddings and to the output bias, which were loaded.
    assert not unexpected and all(".decoder." in k for k in missing), (missing, unexpected)
    head = model.cls.predictions
    assert torch.equal(head.decoder.bias, head.bias) and torch.equal(
        head.decoder.weight, model.bert.embeddings.word_embeddings.weight)
    return model


# ---------------------------------------------------------------------------------------------
# One run per framework and seed


def train_ptft(cfg, job, seed: int, held_batches) -> dict:
    import jax

    from ptft_jax.train.engine import build
    held, order = splits(len(job.train_rows), seed, cfg.train.steps, cfg.train.global_batch)
    engine = build(cfg, job.task, jax.devices()[:1])
    state = engine.init(jax.random.key(seed))
    losses, evals, t0 = [], {}, time.perf_counter()
    for step, idx in enumerate(order, 1):
        rows = job.train_rows.rows(idx)
        state, metrics = engine.step_fn(state, engine.to_device(rows), jax.random.key(seed))
        losses.append(float(metrics["loss"]))
        if step % EVAL_EVERY == 0:
            evals[step] = held_out_loss(ptft_as_bert(cfg, jax.device_get(state.params)),
                                        held_batches)
    return {"losses": losses, "held_out": evals, "seconds": time.perf_counter() - t0}


def train_torch(cfg, job, seed: int, held_batches, run_dir: Path) -> dict:
    import torch
    import transformers

    from ptft_jax.train.optim import make_schedule
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(hf_config(cfg))
    held, order = splits(len(job.train_rows), seed, cfg.train.steps, cfg.train.global_batch)
    o = cfg.optim
    named = [(n, p) for n, p in model.named_parameters()]
    decayed = {n: p.ndim > 1 and "embeddings" not in n for n, p in named}  # ptft's rules
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if decayed[n]], "weight_decay": o.weight_decay},
         {"params": [p for n, p in named if not decayed[n]], "weight_decay": 0.0}],
        lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
    schedule = make_schedule(o, cfg.train.steps)  # the same schedule, as a function
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(schedule(s)) / o.learning_rate)
    mask, special = collator(run_dir), list(job.task.spec.special_ids)
    losses, evals, t0 = [], {}, time.perf_counter()
    for step, idx in enumerate(order, 1):
        loss = model(**torch_inputs(job.train_rows.rows(idx), mask, special)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % EVAL_EVERY == 0:
            evals[step] = held_out_loss(model, held_batches)
    return {"losses": losses, "held_out": evals, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Report


def spread(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def markdown(rows: list[dict], env: dict) -> str:
    steps = sorted({int(s) for r in rows for s in r["held_out"]})
    shown = [s for s in steps if s % 100 == 0] or steps
    lines = [f"Machine: {env['machine']} ({env.get('isa', '?')}); jax {env['jax']}, torch "
             f"{env.get('torch', '-')}, transformers {env.get('transformers', '-')}. Held-out "
             f"MLM loss ({HELD_OUT} packed rows of the KJV, masked once), mean ± half the "
             f"range over seeds.\n",
             "| model | trainer | seeds | " + " | ".join(f"held-out @{s}" for s in shown)
             + " | training loss, last 10 steps |", "|---" * (4 + len(shown)) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["trainer"]), []).append(r)
    for (preset, trainer), rs in groups.items():
        cells = [spread([r["held_out"][str(s)] for r in rs]) for s in shown]
        lines.append(f"| {preset} | {trainer} | {len(rs)} | " + " | ".join(cells)
                     + f" | {spread([np.mean(r['losses'][-10:]) for r in rs])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for i, trainer in enumerate(sorted({r["trainer"] for r in rows})):
            rs = [r for r in rows if (r["preset"], r["trainer"]) == (preset, trainer)]
            if not rs:
                continue
            curves = np.array([np.convolve(r["losses"], np.ones(10) / 10, "valid") for r in rs])
            steps = np.arange(10, 10 + curves.shape[1])
            ax.plot(steps, curves.mean(0), color=f"C{i}", label=f"{trainer} (training)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.2)
            at = sorted(int(s) for s in rs[0]["held_out"])
            held = np.array([[r["held_out"][str(s)] for s in at] for r in rs])
            ax.errorbar(at, held.mean(0), yerr=[held.mean(0) - held.min(0),
                                                held.max(0) - held.mean(0)],
                        color=f"C{i}", marker="o", linestyle="--", label=f"{trainer} (held out)")
        ax.set(title=f"{preset} MLM on the KJV", xlabel="step", ylabel="MLM loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["bert-tiny", "bert-mini"])
    parser.add_argument("--trainers", nargs="+", default=["ptft", "transformers"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's 300")
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "mlm_parity_data"))
    parser.add_argument("--out", default=None, help="results folder (default: by device)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(2)
    from ptft_jax.bench.report import device_slug, environment
    env = environment()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "mlm-parity.jsonl"
    data_dir = Path(args.data_dir)
    for preset in args.presets:
        cfg, job = prepare(preset, data_dir, args.steps)
        held, _ = splits(len(job.train_rows), 0, 1, 1)
        torch.manual_seed(1234)
        mask, special = collator(data_dir), list(job.task.spec.special_ids)
        held_batches = [torch_inputs(job.train_rows.rows(held[i:i + 32]), mask, special)
                        for i in range(0, HELD_OUT, 32)]
        for trainer in args.trainers:
            for seed in args.seeds:
                result = (train_ptft(cfg, job, seed, held_batches) if trainer == "ptft" else
                          train_torch(cfg, job, seed, held_batches, data_dir))
                row = {"preset": preset, "trainer": trainer, "seed": seed, **result,
                       "commit": env["git_commit"], "machine": env["machine"]}
                print(f"{preset} {trainer} seed {seed}: held-out "
                      + " ".join(f"{k}:{v:.3f}" for k, v in result["held_out"].items())
                      + f" ({result['seconds']:.0f} s)", flush=True)
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    (out / "mlm-parity.md").write_text(markdown(rows, env))
    plot(rows, out / "mlm-parity.png")
    print((out / "mlm-parity.md").read_text())


if __name__ == "__main__":
    main()
