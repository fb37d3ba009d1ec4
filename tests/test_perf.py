"""FLOPs accounting and MFU against hand-computed figures."""
from types import SimpleNamespace

import pytest

from ptft_jax.config.load import load_config
from ptft_jax.models.flops import matmul_params, train_flops_per_token
from ptft_jax.train import peak


def test_bert_base_flops_per_token_by_hand():
    cfg = load_config(None, ["model.preset=bert-base"]).model
    d, f, layers, vocab, seq = 768, 3072, 12, 30522, 128
    # Per layer: Q, K, V, O projections (4 d^2) and the MLP (2 d f); then the MLM transform
    # (d^2) and the tied output projection (vocab d).
    n = layers * (4 * d * d + 2 * d * f) + d * d + vocab * d
    assert n == 108_965_376
    assert matmul_params(cfg) == n
    assert train_flops_per_token(cfg, seq) == 6 * n + 12 * layers * seq * d == 667_948_032
    # Masked LM runs the head (transform + projection) at its 20 masked slots of 128 only.
    head = d * d + vocab * d
    assert train_flops_per_token(cfg, seq, predicted_positions=20) == \
        6 * (n - head + head * 20 / 128) + 12 * layers * seq * d


def test_masked_lm_job_counts_its_slots_for_flops():
    from ptft_jax.data.tokenizer import TokenIds
    from ptft_jax.jobs.lm import lm_throughput
    from ptft_jax.tasks.factory import make_task, mlm_spec
    cfg = load_config(None, ["model.preset=bert-base", "data.seq_len=128"])
    ids = TokenIds(vocab_size=30522, special_ids=(0, 1, 2, 3, 4), bos_id=2, eos_id=3, mask_id=4)
    mlm = lm_throughput(cfg, make_task(cfg, mlm=mlm_spec(cfg, ids)))
    assert mlm.flops_per_unit == train_flops_per_token(cfg.model, 128, predicted_positions=20)
    assert (mlm.unit, mlm.units_per_row) == ("tokens", 128)
    gpt = load_config(None, ["model.preset=gpt2-small", "train.task=clm"])
    assert lm_throughput(gpt, make_task(gpt)).flops_per_unit == \
        train_flops_per_token(gpt.model, gpt.data.seq_len)


def test_gpt2_small_flops_and_mfu_by_hand():
    cfg = load_config(None, ["model.preset=gpt2-small"]).model
    flops = train_flops_per_token(cfg, 1024)
    assert flops == 6 * (12 * (4 * 768**2 + 2 * 768 * 3072) + 50257 * 768) + 12 * 12 * 1024 * 768
    # 580K tokens/s on one H100 SXM (989 TFLOP/s) is 50% MFU, the target.
    assert peak.mfu(580_000, flops, 989e12) == pytest.approx(0.501, abs=0.001)


@pytest.mark.parametrize("kind, platform, expected", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
    ("NVIDIA H100 PCIe", "gpu", 756e12),
    ("NVIDIA H200", "gpu", 989e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12),
    ("TPU v5p", "tpu", 459e12),
    ("TPU v6 lite", "tpu", 918e12),
    ("cpu", "cpu", None),
])
def test_peak_table(kind, platform, expected):
    assert peak.device_peak_flops(SimpleNamespace(device_kind=kind, platform=platform)) == expected


def test_cpu_ceiling_is_measured():
    flops, source = peak.system_peak_flops()
    assert source == "measured dense-matmul ceiling"
    assert 1e8 < flops < 1e14


def _timings(*flops):
    """A ceiling measurement that returns these figures in turn (a machine busy, then idle)."""
    figures = iter(flops)
    return lambda: (next(figures), peak.MEASURED)


def test_mfu_above_100_percent_retimes_the_ceiling():
    # Timed while another process loaded the machine: 0.04 TFLOP/s, then 2 TFLOP/s idle.
    reference = peak.MfuReference(_timings(0.04e12, 2e12))
    value = reference.mfu(1000, 0.1e9)  # 0.1 TFLOP/s achieved
    assert value == pytest.approx(0.05)
    assert reference.flops == 2e12 and not reference.too_low
    assert reference.warning_once(value) is None


def test_mfu_still_above_100_percent_says_the_ceiling_is_wrong_once():
    reference = peak.MfuReference(_timings(0.04e12, 0.05e12, 0.03e12))
    value = reference.mfu(1000, 0.1e9)
    assert value == pytest.approx(2.0) and reference.too_low
    warning = reference.warning_once(value)
    assert "above 100%" in warning and "unreliable" in warning
    assert reference.mfu(1000, 0.1e9) == pytest.approx(2.0)  # the ceiling never falls
    assert reference.warning_once(value) is None


def test_datasheet_peak_is_not_retimed():
    reference = peak.MfuReference(lambda: (1e12, "datasheet peak of H100"))
    assert reference.mfu(1000, 0.5e9) == pytest.approx(0.5) and not reference.too_low

