"""From random initialisation, does a ptft image model train as fast as the same model in
PyTorch? One recipe, the same batches, three seeds; only the initial weights differ.

    python -m benchmarks.init_parity [--data digits fmnist] [--models vit resnet]
                                     [--inits ptft torch hf] [--seeds 0 1 2]

Models (ptft presets, one grey channel, the data's image size):
- vit: vit-mini4 (patch 4, 4 pre-norm blocks, width 192, 3 heads, class token). References:
  `torch`, the same ViT in plain PyTorch modules at their default initialisation
  (nn.Conv2d patches, nn.TransformerEncoderLayer blocks built one by one, nn.Linear head; class
  token zero, positions N(0, 0.02) as timm / DeiT draw them); `hf`, transformers'
  ViTForImageClassification at its own initialisation (truncated normal, std 0.02).
- resnet: resnet18-small at width 16 (3x3 stem, no max pooling, basic blocks). Reference
  `torch`: the same network in PyTorch initialised as torchvision's ResNets are (convs
  Kaiming-normal fan-out, BatchNorm 1 / 0, nn.Linear's default head).

Data: `digits`, scikit-learn's 8x8 digits (1,797 images, BSD licence) enlarged to 16x16 by
pixel repetition, an 80/20 split (1,437 / 360); `fmnist`, a 6,000-image subset of
Debian's Fashion-MNIST training set (28x28, MIT licence), tested on all 10,000 test images.

Recipe (the one issue 23 measured): batch 64, 300 steps, AdamW lr 2e-3 (b2 0.999), weight
decay 0.01 on kernels only (ptft's default rules, mirrored on the PyTorch side), 30 warm-up
steps then cosine to 0.1x, global-norm clipping at 1.0, no augmentation, no dropout, no label
smoothing. Each seed fixes the initial weights and the batch order; both sides see the same
batches. Reported: the training loss averaged over the 10 steps up to steps 50 / 100 / 200 /
300, and test accuracy. Writes benchmarks/results/<device>/init-parity.{jsonl,md,png}
(rows are appended; --label names a row's ptft initialisation, e.g. an older commit's, run
with PYTHONPATH pointing at its checkout).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
RECIPE = dict(batch=64, steps=300, learning_rate=2e-3, weight_decay=0.01, warmup=30,
              end_ratio=0.1, clip=1.0)
MILESTONES = (50, 100, 200, 300)
PRESETS = {"vit": "vit-mini4", "resnet": "resnet18-small"}


def load_data(name: str):
    """(train images uint8 [n, h, w, 1], train labels, test images, test labels)."""
    if name == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.kron(digits.images, np.ones((2, 2))) * (255 / 16)
        images = images.round().astype(np.uint8)[..., None]
        order = np.random.default_rng(0).permutation(len(images))
        cut = int(0.8 * len(images))
        train, test = order[:cut], order[cut:]
        return images[train], digits.target[train], images[test], digits.target[test]

    def idx(split: str, kind: str) -> np.ndarray:
        raw = gzip.open(FMNIST / f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
                        ).read()
        return np.frombuffer(raw, np.uint8, offset=16 if kind == "images" else 8)

    if not FMNIST.exists():
        raise SystemExit(f"{FMNIST} is missing: apt install dataset-fashion-mnist")
    x, y = idx("train", "images").reshape(-1, 28, 28, 1), idx("train", "labels")
    subset = np.random.default_rng(0).permutation(len(x))[:6000]
    return (x[subset], y[subset], idx("t10k", "images").reshape(-1, 28, 28, 1),
            idx("t10k", "labels"))


def batch_order(n: int, seed: int) -> list[np.ndarray]:
    """The index batches of a run: a fresh permutation of the training set each epoch."""
    rng, order = np.random.default_rng(1000 + seed), []
    while len(order) < RECIPE["steps"]:
        perm = rng.permutation(n)
        order += [perm[i:i + RECIPE["batch"]] for i in range(0, n - RECIPE["batch"] + 1,
                                                              RECIPE["batch"])]
    return order[:RECIPE["steps"]]


def lr_factor(step: int) -> float:
    """ptft's schedule: linear warm-up from 0, then cosine to end_ratio."""
    warmup, total, end = RECIPE["warmup"], RECIPE["steps"], RECIPE["end_ratio"]
    if step < warmup:
        return step / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))


def ptft_config(model: str, size: int):
    from ptft_jax.config.load import load_config
    overrides = [f"model.preset={PRESETS[model]}", f"model.image_size={size}", "model.channels=1",
                 "model.dropout=0.0", "model.dtype=float32", "train.task=image_classification",
                 f"train.steps={RECIPE['steps']}", f"train.global_batch={RECIPE['batch']}",
                 f"optim.learning_rate={RECIPE['learning_rate']}",
                 f"optim.weight_decay={RECIPE['weight_decay']}",
                 f"optim.warmup_steps={RECIPE['warmup']}",
                 f"optim.end_lr_ratio={RECIPE['end_ratio']}", f"optim.clip_norm={RECIPE['clip']}",
                 "mesh.data=-1", "train.progress=false"]
    if model == "resnet":
        overrides.append("model.resnet_width=16")
    return load_config(None, overrides)


def train_ptft(model: str, data, seed: int) -> dict:
    """ptft's own initialisation (engine.init with the seed), trained by its jitted step."""
    import jax

    from ptft_jax.data.augment import normalize
    from ptft_jax.tasks.base import apply_model
    from ptft_jax.tasks.image import ImageClassifyTask
    from ptft_jax.train.engine import build
    x, y, tx, ty = data
    cfg = ptft_config(model, x.shape[1])
    task = ImageClassifyTask(cfg.model, [str(i) for i in range(10)], cfg.augment)
    engine = build(cfg, task, jax.devices()[:1])
    state = engine.init(jax.random.key(seed))
    losses, t0 = [], time.perf_counter()
    for idx in batch_order(len(x), seed):
        batch = {"image": x[idx], "label": y[idx].astype(np.int32),
                 "weight": np.ones(len(idx), np.float32)}
        state, metrics = engine.step_fn(state, engine.to_device(batch), jax.random.key(seed))
        losses.append(float(metrics["loss"]))
    seconds = time.perf_counter() - t0

    @jax.jit
    def predict(params, model_state, images):
        logits, _ = apply_model(task.model, params, model_state,
                                normalize(images, cfg.augment), train=False)
        return logits.argmax(-1)
    predicted = np.concatenate([np.asarray(predict(state.params, state.model_state,
                                                   tx[i:i + 500]))
                                for i in range(0, len(tx), 500)])
    return {"losses": losses, "accuracy": float(np.mean(predicted == ty)), "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The PyTorch references


def torch_model(model: str, init: str, size: int, seed: int):
    """(the reference network, which of its names ptft's decay rules exempt beyond biases and
    norms: the patch embedding and positions, by ptft's `embed` rule)."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    cfg = ptft_config(model, size).model
    if model == "vit" and init == "hf":
        import transformers
        vit = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=size, patch_size=cfg.patch_size, num_channels=1,
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            layer_norm_eps=cfg.norm_eps))
        return _Logits(vit), lambda name: "patch_embeddings" in name or "position" in name
    if model == "vit":
        return _TorchViT(cfg, size), lambda name: name.startswith(("patch.", "pos"))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.proj is None else self.proj(x)))

    w, layers, cin = cfg.resnet_width, [], cfg.resnet_width
    for stage, count in enumerate(cfg.resnet_stages):
        for i in range(count):
            layers.append(Block(cin, w * 2 ** stage, 2 if stage and not i else 1))
            cin = w * 2 ** stage
    net = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    for m in net.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, lambda name: False


class _Logits:
    """A transformers image classifier as a callable from pixels to logits."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x):
        return self.model(pixel_values=x).logits


def _TorchViT(cfg, size: int):
    import torch
    from torch import nn

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            d, p = cfg.hidden_size, cfg.patch_size
            self.patch = nn.Conv2d(1, d, p, p)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, (size // p) ** 2 + 1, d) * 0.02)
            # Built one by one: nn.TransformerEncoder would copy one layer's initial weights.
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(
                d, cfg.num_heads, cfg.mlp_dim, dropout=0.0, activation="gelu",
                layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=True)
                for _ in range(cfg.num_layers))
            self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x)[:, 0])
    return ViT()


def train_torch(model: str, init: str, data, seed: int) -> dict:
    import torch
    x, y, tx, ty = data
    net, exempt = torch_model(model, init, x.shape[1], seed)

    def pixels(images):  # ptft's normalisation (augment.mean / std 0.5), NCHW
        return torch.as_tensor((images.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    named = list(net.named_parameters())
    decayed = {n: p.ndim > 1 and not exempt(n) for n, p in named}  # kernels, as ptft's rules
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if decayed[n]], "weight_decay": RECIPE["weight_decay"]},
         {"params": [p for n, p in named if not decayed[n]], "weight_decay": 0.0}],
        lr=RECIPE["learning_rate"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    net.train()
    losses, t0 = [], time.perf_counter()
    for idx in batch_order(len(x), seed):
        loss = torch.nn.functional.cross_entropy(net(pixels(x[idx])),
                                                 torch.as_tensor(y[idx]).long())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), RECIPE["clip"])
        opt.step()
        sched.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(pixels(tx[i:i + 500])).argmax(-1)
                               for i in range(0, len(tx), 500)]).numpy()
    return {"losses": losses, "accuracy": float(np.mean(predicted == ty)), "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Report


def at(losses, step: int) -> float:
    return float(np.mean(losses[max(0, step - 10):step]))


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"Machine: {env['machine']} ({env.get('isa', '?')}), jax {env['jax']}, torch "
             f"{env.get('torch', '-')}; recipe: {RECIPE}. Training loss averaged over the 10 "
             f"steps up to each step; mean ± half the range over seeds.\n",
             "| data | model | init | seeds | " + " | ".join(f"loss@{s}" for s in MILESTONES)
             + " | test accuracy |", "|---" * (5 + len(MILESTONES)) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], r["init"]), []).append(r)

    def spread(values):
        values = np.asarray(values)
        return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"
    for (data, model, init), rs in groups.items():
        losses = [spread([at(r["losses"], s) for r in rs]) for s in MILESTONES]
        lines.append(f"| {data} | {model} | {init} | {len(rs)} | " + " | ".join(losses)
                     + f" | {spread([r['accuracy'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["data"], r["model"]) for r in rows})
    colours = {init: f"C{i}" for i, init in enumerate(sorted({r["init"] for r in rows}))}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (data, model) in zip(axes[0], panels):
        inits = sorted({r["init"] for r in rows if (r["data"], r["model"]) == (data, model)})
        for init in inits:
            curves = np.array([np.convolve(r["losses"], np.ones(10) / 10, "valid")
                               for r in rows if (r["data"], r["model"], r["init"]) ==
                               (data, model, init)])
            steps = np.arange(10, 10 + curves.shape[1])
            ax.plot(steps, curves.mean(0), label=init, color=colours[init])
            ax.fill_between(steps, curves.min(0), curves.max(0), color=colours[init], alpha=0.2)
        ax.set(title=f"{model} on {data}", xlabel="step", ylabel="training loss (10-step mean)",
               yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=["digits", "fmnist"])
    parser.add_argument("--models", nargs="+", default=["vit", "resnet"])
    parser.add_argument("--inits", nargs="+", default=["ptft", "torch"],
                        help="ptft | torch | hf (hf: ViT only)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--label", default="ptft", help="the name of ptft's rows")
    parser.add_argument("--out", default=None, help="results folder (default: by device)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(2)
    from ptft_jax.bench.report import device_slug, environment
    env = environment()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "init-parity.jsonl"
    for data_name in args.data:
        data = load_data(data_name)
        for model in args.models:
            for init in args.inits:
                if init == "hf" and model != "vit":
                    continue
                for seed in args.seeds:
                    result = (train_ptft(model, data, seed) if init == "ptft"
                              else train_torch(model, init, data, seed))
                    name = args.label if init == "ptft" else f"pytorch ({init})"
                    row = {"data": data_name, "model": model, "init": name, "seed": seed,
                           **result, "commit": env["git_commit"], "machine": env["machine"]}
                    print(f"{data_name} {model} {name} seed {seed}: loss@"
                          + "/".join(f"{at(result['losses'], s):.3f}" for s in MILESTONES)
                          + f" accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)",
                          flush=True)
                    with open(log, "a") as f:
                        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    (out / "init-parity.md").write_text(markdown(rows, env))
    plot(rows, out / "init-parity.png")
    print((out / "init-parity.md").read_text())


if __name__ == "__main__":
    main()
