"""Why ptft's padded classifier step trails PyTorch's on a CPU: the same matmuls, timed apart.

One BERT layer's MLP without its activation (rows x 256 -> 1024 -> 256, forward and backward:
six matmuls and nothing else), the attention core alone (scores, padding mask, softmax,
weighted sum: `jax.nn.dot_product_attention` against PyTorch's `scaled_dot_product_attention`)
and one whole post-norm BERT layer (attention with a padding
mask, MLP with exact GELU, two layer norms), in JAX under `jax.jit` and in PyTorch eager
(`transformers`' BertLayer, SDPA and eager attention), at bert-mini's shape by default
(batch 32 x 128, width 256, 4 heads; all-MiniLM-L6-v2's: --width 384 --heads 12). The
attention core is also timed in two other JAX forms (the batch cut into 4 independent parts;
heads-major einsums written out) and its q.k products alone. Same process, same inputs,
median of 10 calls after two warm-up calls. Figures in the README ("Finetuning, 1 CPU device").

    .venv/bin/python -m benchmarks.matmul_gap [--batch 32] [--len 128] [--width 256] [--heads 4]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_ms(fn, calls: int = 10) -> float:
    fn(), fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-12)


def jax_cases(x, valid, heads):
    B, T, D = x.shape
    K, M = D // heads, 4 * D
    rng = np.random.default_rng(1)
    p = {n: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02) for n, s in [
        ("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("wo", (D, D)), ("wi", (D, M)),
        ("wo2", (M, D))]}
    mask = jnp.asarray(valid[:, None, None, :] & valid[:, None, :, None])

    def matmuls(p, x):  # the MLP's matmuls alone
        return jnp.sum(((x.reshape(-1, D) @ p["wi"]) @ p["wo2"]) ** 2)

    def bert_layer(p, x):  # as models/layers.py computes it
        q, k, v = (jnp.einsum("bld,dhk->blhk", x, p[n].reshape(D, heads, K))
                   for n in ("wq", "wk", "wv"))
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = layer_norm(x + jnp.einsum("blhk,hkd->bld", attended, p["wo"].reshape(heads, K, D)))
        y = layer_norm(y + jax.nn.gelu(y @ p["wi"], approximate=False) @ p["wo2"])
        return jnp.sum(y * y)

    q, k, v = (jnp.asarray(rng.normal(size=(B, T, heads, K)).astype(np.float32))
               for _ in range(3))

    def attention(q, kv):  # the attention core alone: scores, mask, softmax, weighted sum
        return jnp.sum(jax.nn.dot_product_attention(q, *kv, mask=mask) ** 2)

    def attention_in_parts(q, kv):  # the same, the batch cut into 4 independent programs
        parts = zip(*(jnp.split(t, 4) for t in (q, *kv, mask)))
        return sum(jnp.sum(jax.nn.dot_product_attention(a, b, c, mask=m) ** 2)
                   for a, b, c, m in parts)

    # Written out, heads-major: [batch, heads, len, k]. The form these results led to, as the
    # model runs it on a CPU, is models/layers.heads_major_attention (batched matmuls).
    def attention_heads_major(q, kv):
        qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, *kv))
        scores = jnp.where(mask, jnp.einsum("bhqd,bhkd->bhqk", qh * K ** -0.5, kh), -1e30)
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores), vh) ** 2)

    def scores(q, kv):  # q . k alone: the batched [len, k] x [k, len] products
        return jnp.sum(jnp.einsum("bqhd,bkhd->bhqk", q, kv[0]) ** 2)

    out = {}
    cases = (("MLP matmuls", matmuls, (p, x)), ("attention core", attention, (q, (k, v))),
             ("attention core, batch in 4 parts", attention_in_parts, (q, (k, v))),
             ("attention core, heads-major einsums", attention_heads_major, (q, (k, v))),
             ("attention scores q.k alone", scores, (q, (k, v))),
             ("BERT layer", bert_layer, (p, x)))
    for name, f, args in cases:
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        out[name] = median_ms(lambda: jax.block_until_ready(step(*args)))
    return out


def torch_cases(x, valid, heads):
    import torch
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    B, T, D = x.shape
    torch.manual_seed(0)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    wi = torch.randn(D, 4 * D, requires_grad=True)
    wo = torch.randn(4 * D, D, requires_grad=True)
    out = {"MLP matmuls": median_ms(
        lambda: (((xt.reshape(-1, D) @ wi) @ wo) ** 2).sum().backward())}
    q, k, v = (torch.randn(B, heads, T, D // heads, requires_grad=True) for _ in range(3))
    pairs = torch.tensor(valid[:, None, None, :] & valid[:, None, :, None])
    out["attention core"] = median_ms(lambda: (torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=pairs) ** 2).sum().backward())
    additive = torch.zeros(B, 1, 1, T)
    additive[~torch.tensor(valid)[:, None, None, :]] = -1e9
    for attention in ("sdpa", "eager"):
        layer = BertLayer(BertConfig(hidden_size=D, num_attention_heads=heads,
                                     intermediate_size=4 * D, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0,
                                     attn_implementation=attention))

        def step():
            y = layer(xt, attention_mask=additive)
            y = y[0] if isinstance(y, tuple) else y
            (y * y).sum().backward()
        out[f"BERT layer ({attention} attention)"] = median_ms(step)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--len", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.len, args.width)).astype(np.float32))
    lengths = rng.integers(args.len // 4, args.len + 1, args.batch)
    valid = np.arange(args.len)[None] < lengths[:, None]
    flops = 6 * 2 * args.batch * args.len * args.width * 4 * args.width
    print(f"batch {args.batch} x {args.len}, width {args.width}, {args.heads} heads; "
          f"the MLP's matmuls: {flops / 1e9:.1f} GFLOP forward + backward\n")
    print("| what (forward + backward) | JAX ms | PyTorch ms |\n|---|---|---|")
    ours, theirs = jax_cases(x, valid, args.heads), torch_cases(x, valid, args.heads)
    print(f"| MLP matmuls | {ours['MLP matmuls']:.1f} | {theirs['MLP matmuls']:.1f} |")
    print(f"| attention core (XLA's; PyTorch's SDPA) | {ours['attention core']:.1f} | "
          f"{theirs['attention core']:.1f} |")
    for variant in ("batch in 4 parts", "heads-major einsums"):
        print(f"| attention core, {variant} | {ours[f'attention core, {variant}']:.1f} | - |")
    print(f"| attention scores q.k alone | {ours['attention scores q.k alone']:.1f} | - |")
    for attention in ("sdpa", "eager"):
        print(f"| BERT layer ({attention} attention in PyTorch) | {ours['BERT layer']:.1f} | "
              f"{theirs[f'BERT layer ({attention} attention)']:.1f} |")


if __name__ == "__main__":
    main()
