"""The PyTorch reference for `ptft bench`: the same architecture and shapes in Hugging Face
`transformers` (GPT2LMHeadModel, BertForMaskedLM, ViTForImageClassification) or `torchvision`
(ResNet-18 / ResNet-50), AdamW with global-norm clipping, the same global batch, timed the
same way (warm-up discarded, synchronised, median of N steps).

Optional: needs `torch` and `transformers` (here: pip install torch==2.13.0 transformers).
It steps on ptft's own benchmark rows: packed documents, their positions restarting at each
document, and a 4-D boolean attention mask that keeps documents apart (plus the causal mask
for GPT-2), so both frameworks run attention with the mask training needs. Causal-LM labels
stop at document boundaries as ptft's do. Masked-LM masking happens inside the timed step, as
it does in ptft's jitted step; Hugging Face's BertForMaskedLM computes logits at every
position, as it does in training.

Image models step on ptft's uint8 batches moved to the device once; the timed step scales,
normalises and randomly flips them there, as ptft's jitted step does, then trains with
label-smoothed (0.1) cross-entropy. ResNets come from torchvision when it imports (its PyPI
wheels load only beside a matching torch build), else from transformers' ResNet at the same
shape (the same stem, blocks and widths; reported in the row).
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

SPECIAL_IDS = 5  # ids below this are special tokens, as in ptft's synthetic data


def build_model(mcfg):
    if mcfg.kind == "decoder":
        hf = GPT2Config(vocab_size=mcfg.vocab_size, n_positions=mcfg.max_len,
                        n_embd=mcfg.hidden_size, n_layer=mcfg.num_layers,
                        n_head=mcfg.num_heads, n_inner=mcfg.mlp_dim,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True)
        return GPT2LMHeadModel(hf)
    hf = BertConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size,
                    num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                    intermediate_size=mcfg.mlp_dim, max_position_embeddings=mcfg.max_len,
                    hidden_act="gelu", hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, type_vocab_size=max(1, mcfg.type_vocab_size))
    return BertForMaskedLM(hf)


def mask_tokens(tokens, vocab_size, mask_id=4, rate=0.15):
    """BERT's 80/10/10 masking, on the device, as ptft does inside its step (specials, ids
    below SPECIAL_IDS, are never selected)."""
    selected = (torch.rand(tokens.shape, device=tokens.device) < rate) & (tokens >= SPECIAL_IDS)
    how = torch.rand(tokens.shape, device=tokens.device)
    random_tokens = torch.randint(SPECIAL_IDS, vocab_size, tokens.shape, device=tokens.device)
    inputs = torch.where(selected & (how < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
    labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
    return inputs, labels


def to_torch_batch(batch: dict, causal: bool, device: str) -> dict:
    """ptft's host batch (NumPy tokens, segment_ids, positions) as model kwargs."""
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
    out = {"input_ids": tokens}
    if "segment_ids" in batch:
        seg = torch.as_tensor(batch["segment_ids"], device=device)
        mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        if causal:
            mask &= torch.ones(mask.shape[1:], dtype=torch.bool, device=device).tril()
        out["attention_mask"] = mask[:, None]  # [batch, 1, q, k], True = may attend
        out["position_ids"] = torch.as_tensor(batch["positions"], dtype=torch.long,
                                              device=device)
        if causal:  # the model shifts labels: label t is position t-1's target
            labels = tokens.clone()
            labels[:, 1:][seg[:, 1:] != seg[:, :-1]] = -100
            out["labels"] = labels
    if causal and "labels" not in out:
        out["labels"] = tokens
    return out


def time_case(cfg, host_batches: list[dict], compiled: bool, steps: int, warmup: int) -> dict:
    """Times `steps` training steps of the reference on ptft's rows; returns medians like
    ptft's rows."""
    if cfg.model.kind in ("vit", "resnet"):
        return time_image_case(cfg, host_batches, compiled, steps, warmup)
    if cfg.model.kind == "two_tower":
        return time_clip_case(cfg, host_batches, compiled, steps, warmup)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device == "cuda")
    model = build_model(cfg.model).to(device).train()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay,
                            betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
    forward = torch.compile(model) if compiled else model
    causal = cfg.model.kind == "decoder"
    batches = [to_torch_batch(b, causal, device) for b in host_batches]
    micro = cfg.train.global_batch // cfg.train.grad_accum

    def step(batch):
        for start in range(0, cfg.train.global_batch, micro):
            kwargs = {k: v[start:start + micro] for k, v in batch.items()}
            if not causal:
                kwargs["input_ids"], kwargs["labels"] = mask_tokens(kwargs["input_ids"],
                                                                    cfg.model.vocab_size)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = forward(**kwargs).loss / cfg.train.grad_accum
            loss.backward()
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = cfg.train.global_batch * cfg.data.seq_len
    return {**_timed(step, batches, steps, warmup, device, tokens), "bf16": bf16}


def build_image_model(mcfg, num_classes: int):
    """(model, where it comes from) at ptft's shape: a callable from float NCHW pixels to
    logits."""
    import transformers as tr
    if mcfg.kind == "vit":
        model = tr.ViTForImageClassification(tr.ViTConfig(
            hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
            num_attention_heads=mcfg.num_heads, intermediate_size=mcfg.mlp_dim,
            image_size=mcfg.image_size, patch_size=mcfg.patch_size,
            num_channels=mcfg.channels, num_labels=num_classes, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=mcfg.norm_eps or 1e-6))
        model.config._attn_implementation = "sdpa"
        return (lambda x: model(pixel_values=x).logits), model, "transformers ViT"
    bottleneck = mcfg.resnet_block == "bottleneck"
    known = {((3, 4, 6, 3), True): "resnet50", ((2, 2, 2, 2), False): "resnet18"}
    name = known.get((tuple(mcfg.resnet_stages), bottleneck))
    if mcfg.resnet_stem == "small" or mcfg.resnet_width != 64 or mcfg.channels != 3:
        name = None
    try:
        import torchvision
        if name is None:
            raise ImportError
        model = getattr(torchvision.models, name)(num_classes=num_classes)
        return model, model, f"torchvision {name}"
    except Exception:  # not importable beside this torch build, or not its shape
        if mcfg.resnet_stem == "small":
            raise ValueError("no PyTorch reference for the small (3x3) ResNet stem")
        widths = [mcfg.resnet_width * 2 ** i * (4 if bottleneck else 1)
                  for i in range(len(mcfg.resnet_stages))]
        model = tr.ResNetForImageClassification(tr.ResNetConfig(
            num_channels=mcfg.channels, embedding_size=mcfg.resnet_width, hidden_sizes=widths,
            depths=list(mcfg.resnet_stages),
            layer_type="bottleneck" if bottleneck else "basic", num_labels=num_classes,
            downsample_in_first_stage=False))
        return (lambda x: model(pixel_values=x).logits), model, "transformers ResNet"


def time_image_case(cfg, host_batches: list[dict], compiled: bool, steps: int,
                    warmup: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device == "cuda")
    from ptft_jax.bench.workloads import IMAGE_CLASSES
    forward, model, source = build_image_model(cfg.model, IMAGE_CLASSES)
    model.to(device).train()
    if device == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay,
                            betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
    forward = torch.compile(forward) if compiled else forward
    batches = [(torch.as_tensor(b["image"], device=device).permute(0, 3, 1, 2),
                torch.as_tensor(b["label"], dtype=torch.long, device=device))
               for b in host_batches]

    def step(batch):
        images, labels = batch
        x = (images.float() / 255.0 - 0.5) / 0.5
        flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        loss.backward()
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = _timed(step, batches, steps, warmup, device, cfg.train.global_batch)
    return {**result, "bf16": bf16, "model": source}


def time_clip_case(cfg, host_batches: list[dict], compiled: bool, steps: int,
                   warmup: int) -> dict:
    """transformers' CLIPModel at the two towers' shapes (its text tower is causal and pools
    the end token, ptft's is a BERT encoder pooled by mean: the same matmuls), with its own
    symmetric contrastive loss over the batch, on ptft's pairs."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device == "cuda")
    image, text = cfg.towers.image.model, cfg.towers.text.model
    projection = cfg.towers.image.projection_dim
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.mlp_dim, num_hidden_layers=text.num_layers,
                         num_attention_heads=text.num_heads,
                         max_position_embeddings=text.max_len, projection_dim=projection),
        vision_config=dict(hidden_size=image.hidden_size, intermediate_size=image.mlp_dim,
                           num_hidden_layers=image.num_layers,
                           num_attention_heads=image.num_heads, image_size=image.image_size,
                           patch_size=image.patch_size, num_channels=image.channels,
                           projection_dim=projection),
        projection_dim=projection)).to(device).train()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay)
    forward = torch.compile(model) if compiled else model
    batches = [(torch.as_tensor(b["image"], device=device).permute(0, 3, 1, 2),
                torch.as_tensor(b["tokens"], dtype=torch.long, device=device),
                torch.as_tensor(b["segment_ids"] != 0, dtype=torch.long, device=device))
               for b in host_batches]

    def step(batch):
        images, ids, mask = batch
        pixels = (images.float() / 255.0 - 0.5) / 0.5
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           return_loss=True).loss
        loss.backward()
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = _timed(step, batches, steps, warmup, device, cfg.train.global_batch)
    return {**result, "bf16": bf16, "model": "transformers CLIPModel"}


def _timed(step, batches, steps: int, warmup: int, device: str, units: int) -> dict:
    """Runs the first step (torch.compile compiles there), `warmup` untimed steps, then
    `steps` synchronised timed ones; the median, min and max step times."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step(batches[0])
    sync()
    first_step_s = time.perf_counter() - t0
    for i in range(warmup):
        step(batches[i % 2])
    sync()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % 2])
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3,
            "step_ms_max": max(times) * 1e3, "units_per_s": units / median,
            "first_step_s": first_step_s, "device": device}


def time_classifier(cfg, num_labels: int, compiled: bool, steps: int, warmup: int,
                    lengths=None, dynamic: bool = False) -> dict:
    """A BertForSequenceClassification step (AdamW, clipping), same shapes as ptft's
    classifier: padded rows with an attention mask, one label per row. `lengths`: tokens per
    example of a real set, drawn from (None: uniform between a quarter and all of
    data.seq_len); `dynamic`: each batch padded to its longest row (Hugging Face's dynamic
    padding), else to data.seq_len."""
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device == "cuda")
    mcfg = cfg.model
    hf = BertConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size,
                    num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                    intermediate_size=mcfg.mlp_dim, max_position_embeddings=mcfg.max_len,
                    hidden_act="gelu", hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=num_labels,
                    type_vocab_size=max(1, mcfg.type_vocab_size))
    model = BertForSequenceClassification(hf).to(device).train()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay)
    forward = torch.compile(model) if compiled else model
    B, T = cfg.train.global_batch, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        if lengths is None:
            drawn, width = torch.randint(T // 4, T + 1, (B,), generator=g), T
        else:
            pick = torch.randint(0, len(lengths), (B,), generator=g)
            drawn = torch.as_tensor(lengths)[pick].clamp(max=T)
            width = int(drawn.max()) if dynamic else T
        mask = (torch.arange(width)[None, :] < drawn[:, None]).long()
        ids = torch.randint(SPECIAL_IDS, mcfg.vocab_size, (B, width), generator=g) * mask
        labels = torch.randint(0, num_labels, (B,), generator=g)
        batches.append((ids.to(device), mask.to(device), labels.to(device)))

    def step(batch):
        ids, mask, labels = batch
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, batches, steps, warmup, device, B * T)
