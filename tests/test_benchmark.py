"""Every benchmark case runs two steps at a tiny size (a smoke test: no timing asserted)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tomllib

import ptft_jax
from ptft_jax.bench import benchmark

ALL_CASES = benchmark.load_cases(benchmark.DEFAULT_CASES,
                                 ["cpu", "image-cpu", "memory", "accelerator"], [])


def _distinct_steps(cases):
    """One case per step that differs once shrunk to TINY: sizes and vocabularies drop out."""
    seen = {}
    for c in cases:
        if c.name.endswith(("-dp8", "-fsdp8")):  # test_run_writes_jsonl_markdown_and_chart
            continue
        family = "resnet" if c.preset.startswith("resnet") else c.preset.split("-")[0]
        key = (c.objective, family, c.parallelism, str(c.mesh), c.remat, c.scan,
               c.grad_accum, c.rows, c.loss_chunk is not None)  # TINY sets the dtype
        seen.setdefault(key, c)
    return list(seen.values())
# Shrink the model and batch; keep each case's parallelism, mesh, dtype, remat, scan, accum.
TINY = ("model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "model.mlp_dim=128",
        "model.vocab_size=256", "model.max_len=32", "data.seq_len=16", "train.global_batch=32",
        "model.dtype=float32")
TINY_IMAGE = ("model.image_size=32", "model.num_layers=2", "model.hidden_size=64",
              "model.num_heads=2", "model.mlp_dim=128", "model.resnet_stages=[1,1]",
              "model.resnet_width=8", "train.global_batch=16", "model.dtype=float32")


TINY_PAIRS = ("towers.image.model.image_size=32", "towers.image.model.num_layers=2",
              "towers.image.model.hidden_size=64", "towers.image.model.num_heads=2",
              "towers.image.model.mlp_dim=128", "towers.text.model.num_layers=2",
              "towers.text.model.hidden_size=64", "towers.text.model.num_heads=2",
              "towers.text.model.mlp_dim=128", "towers.text.model.vocab_size=256",
              "towers.image.projection_dim=32", "towers.text.projection_dim=32",
              "data.seq_len=16", "train.global_batch=16", "model.dtype=float32")


def tiny(case):
    return {"image_classification": TINY_IMAGE, "contrastive": TINY_PAIRS}.get(case.objective,
                                                                              TINY)


@pytest.mark.parametrize("case", _distinct_steps(ALL_CASES), ids=lambda c: c.name)
def test_every_kind_of_case_runs_two_steps(case):
    row, batches = benchmark.run_jax_case(case, steps=2, warmup=0, profile_dir=None,
                                          overrides=tiny(case))
    if case.objective == "image_classification":
        assert batches[0]["image"].dtype == np.uint8 and row["unit"] == "image"
    elif case.objective == "contrastive":
        assert row["unit"] == "pair" and batches[0]["tokens"].shape == (16, 16)
    else:
        assert ("segment_ids" in batches[0]) == (case.rows == "packed")
    assert row["steps_timed"] == 2 and row["step_ms_median"] > 0
    assert row["state_bytes_per_device"] > 0 and row["compile_s"] > 0
    assert 0 < row["mfu_vs_measured_ceiling"] < 10


def test_run_writes_jsonl_markdown_and_chart(tmp_path):
    rows = benchmark.run(["bert-mini-dp8", "bert-mini-fsdp8"], [], steps=2, warmup=0,
                         profile=False, cases_file=benchmark.DEFAULT_CASES, out_dir=tmp_path,
                         with_torch=False, echo=lambda *a: None, overrides=TINY)
    (device_dir,) = tmp_path.iterdir()
    jsonl = next(device_dir.glob("*.jsonl"))
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["case"] for r in written] == ["bert-mini-dp8", "bert-mini-fsdp8"]
    for key in ("jax", "device_kind", "device_count", "git_commit", "tokens_per_s",
                "mem_temporaries_bytes", "flops_per_token"):
        assert key in written[0], key
    table = (device_dir / "latest-cases.md").read_text()
    assert "| bert-mini-fsdp8 |" in table
    # FSDP over 8 devices holds about an eighth of data parallelism's parameter + optimizer
    # bytes per device (replicated scalars and biases that 8 does not divide keep it above).
    ratio = rows[1]["state_bytes_per_device"] / rows[0]["state_bytes_per_device"]
    assert 0.1 < ratio < 0.2, ratio
    assert "bert-mini-fsdp8: " in table and "of bert-mini-dp8's per-device" in table
    assert next(device_dir.glob("*.png")).stat().st_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or
                    importlib.util.find_spec("transformers") is None,
                    reason="the PyTorch reference is optional (torch, transformers)")
def test_torch_reference_runs_a_step():
    from ptft_jax.bench.workloads import workload
    torch_ref = benchmark.load_torch_reference()
    for name in ("bert-mini-mlm-s128", "gpt-tiny-clm-s256", "vit-b16-224", "resnet50-224",
                 "clip-vit-ti16-bert-mini"):
        case = benchmark.load_cases(benchmark.DEFAULT_CASES, [], [name])[0]
        cfg = case.config(tiny(case))
        batches = workload(cfg).host_batches
        result = torch_ref.time_case(cfg, batches, compiled=False, steps=2, warmup=0)
        assert result["step_ms_median"] > 0 and result["units_per_s"] > 0


def test_packed_rows_carry_documents_apart():
    cfg = benchmark.load_cases(benchmark.DEFAULT_CASES, [], ["gpt-tiny-clm-s256"])[0].config()
    (batch,) = benchmark.synthetic_batches(cfg, n=1)
    seg, pos = batch["segment_ids"], batch["positions"]
    assert seg.shape == pos.shape == (16, 256) and seg.min() >= 1
    starts = np.diff(seg, axis=1) != 0
    assert starts.any()  # several documents share rows: the attention mask matters
    assert np.all(pos[:, 1:][starts] == 0)  # positions restart at each document


def test_pipeline_case_moves_batches_to_the_device(tmp_path):
    from ptft_jax.bench import pipeline as bench_pipeline
    row = bench_pipeline.run_pipeline_case({"name": "tiny", "seq_len": 64, "global_batch": 8,
                                           "packing": "pack"}, tmp_path,
                                          num_tokens=100_000, batches=3)
    assert row["host_tokens_per_s"] > 0 and row["to_device_tokens_per_s"] > 0


def test_finetune_cases_run_and_lora_trains_a_sliver(tmp_path):
    from ptft_jax.bench import finetune as bench_finetune
    names = ["bert-mini-full", "bert-mini-linear_probe", "bert-mini-gradual_phase1",
             "bert-mini-lora8", "bert-base-full", "bert-base-lora8"]
    rows = bench_finetune.run(names, benchmark.DEFAULT_CASES, tmp_path, steps=2, warmup=0,
                              with_torch=False, echo=lambda *a: None,
                              overrides=TINY + ("model.mlp_dim=256",))
    by = {r["case"]: r for r in rows}
    full, lora, probe = by["bert-mini-full"], by["bert-mini-lora8"], by["bert-mini-linear_probe"]
    assert full["trainable_fraction"] == 1.0 and full["step_ms_median"] > 0
    assert probe["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    assert lora["opt_state_bytes"] < 0.5 * full["opt_state_bytes"]
    assert 0 < by["bert-mini-gradual_phase1"]["trainable_fraction"] < 1
    assert "step_ms_median" not in by["bert-base-lora8"]  # compile only
    # Real lengths (fortunes), packed: fewer rows per step carry the same examples on
    # average. A small model; the cases' own 128 tokens.
    rows = bench_finetune.run(["minilm-fortunes-pad", "minilm-fortunes-pack"],
                              benchmark.DEFAULT_CASES, tmp_path / "real", steps=2,
                              warmup=0, with_torch=False, echo=lambda *a: None,
                              overrides=TINY[:5] + ("model.dtype=float32",))
    pad, pack = rows
    assert pad["rows_per_step"] == pad["examples_per_step"] == 32
    assert pack["rows_per_step"] == 8 and abs(pack["examples_per_step"] - 32) < 8, \
        {k: pack[k] for k in ("rows_per_step", "examples_per_step")}
    table = next(p for p in tmp_path.iterdir() if p.name != "real").joinpath(
        "finetune-latest.md").read_text()
    assert "bert-base-lora8: gradients + optimizer state" in table


def test_profile_splits_step_time_by_model_part(tmp_path):
    case = benchmark.load_cases(benchmark.DEFAULT_CASES, [], ["bert-mini-mlm-s128"])[0]
    row, _ = benchmark.run_jax_case(case, steps=1, warmup=0, profile_dir=tmp_path,
                                    overrides=TINY)
    parts = row["profile_ms_by_category"]
    for part in ("MLP", "attention projections", "vocabulary projection + loss",
                 "MLM transform", "layer norms"):
        assert parts.get(part, 0) > 0, (part, parts)
    summary = (tmp_path / case.name / "summary.md").read_text()
    assert "| backward |" in summary and "transpose(jvp(" in summary
    case = benchmark.load_cases(benchmark.DEFAULT_CASES, [], ["resnet50-224"])[0]
    row, _ = benchmark.run_jax_case(case, steps=1, warmup=0, profile_dir=tmp_path,
                                    overrides=TINY_IMAGE)
    parts = row["profile_ms_by_category"]
    for part in ("convolutions", "batch norm", "augmentation", "optimizer (AdamW, clipping)"):
        assert parts.get(part, 0) > 0, (part, parts)


def test_the_cases_ship_with_the_package():
    # `ptft bench` from an installed wheel finds its cases: the file lies inside the package
    # and pyproject.toml declares it as package data.
    package = Path(ptft_jax.__file__).parent
    assert benchmark.DEFAULT_CASES.is_file()
    assert benchmark.DEFAULT_CASES.is_relative_to(package)
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    relative = benchmark.DEFAULT_CASES.relative_to(package)
    assert str(relative.name) in data[".".join(("ptft_jax", *relative.parent.parts))]


def _cases_file(tmp_path, text: str) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    return path


CASE = "{name: %s, preset: bert-tiny, objective: mlm, seq_len: 16, global_batch: %s%s}"


def test_a_cases_file_is_checked_before_any_case_runs(tmp_path):
    # No defaults: section: the shipped defaults fill what a case leaves unset.
    path = _cases_file(tmp_path, f"sets:\n  s:\n    - {CASE % ('a', 4, '')}\n")
    (case,) = benchmark.load_cases(path, ["s"], [])
    assert case.parallelism == "jit" and case.mesh["data"] == -1 and case.torch is False
    for text, message in [
        ("sets:\n  s:\n    - {name: a, objective: mlm, global_batch: 4}\n",
         "case a does not set preset"),
        (f"sets:\n  s:\n    - {CASE % ('a', 4, '')}\n  t:\n    - {CASE % ('a', 8, '')}\n",
         "two benchmark cases are named 'a'"),
        ("defaults: {scans: true}\nsets:\n  s: []\n", "defaults has unknown keys"),
        ("finetune:\n  - {name: f, preset: bert-tiny, seq_len: 16, global_batch: 4}\n"
         "  - {name: f, preset: bert-tiny, seq_len: 32, global_batch: 4}\n",
         "two finetune cases are named 'f'")]:
        path = _cases_file(tmp_path, text)
        with pytest.raises(benchmark.ConfigError, match=message) as e:
            if "finetune" in text:
                benchmark.named_cases(benchmark.read_cases(path)["finetune"], [], "finetune",
                                      path)
            else:
                benchmark.load_cases(path, ["s"], [])
        assert str(path) in str(e.value)


def test_cases_pick_within_the_set():
    (case,) = benchmark.load_cases(benchmark.DEFAULT_CASES, ["memory"], ["bert-mini-fsdp8"])
    assert case.name == "bert-mini-fsdp8"
    with pytest.raises(benchmark.ConfigError, match=r"bert-mini-fsdp8 \(set memory\): not in "
                                                    r"--set cpu"):
        benchmark.load_cases(benchmark.DEFAULT_CASES, ["cpu"], ["bert-mini-fsdp8"])


def test_bench_exits_2_when_no_case_can_run_or_none_gives_a_result(tmp_path, capsys,
                                                                   monkeypatch):
    from ptft_jax.cli import main
    bad = [(CASE % ("badpreset", 4, "")).replace("bert-tiny", "bert-nope"),
           CASE % ("badmesh", 4, ", mesh: {data: 1, fsdp: 1000, tensor: 1}"),
           CASE % ("batch0", 0, ""), (CASE % ("longseq", 4, "")).replace(": 16", ": 100000")]
    path = _cases_file(tmp_path, "sets:\n  s:\n" + "".join(f"    - {c}\n" for c in bad))
    out = tmp_path / "out"
    bench = ["bench", "--cases-file", str(path), "--no-torch", "--steps", "1", "--warmup", "0"]
    assert main([*bench, "--set", "s", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("skipped: ") == 4 and "bert-nope" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    assert "none of the 4 chosen case(s)" in captured.err and not out.exists()
    # Cases that validate but all fail when they run: exit 2, said in the last line.
    good = _cases_file(tmp_path, f"sets:\n  s:\n    - {CASE % ('a', 8, '')}\n")

    def fail(*args, **kwargs):
        raise ValueError("boom")
    monkeypatch.setattr(benchmark, "run_jax_case", fail)
    assert main([*bench[:1], "--cases-file", str(good), *bench[3:], "--set", "s",
                 "--out", str(out)]) == 2
    assert "no case produced a result: all 1 failed" in capsys.readouterr().err
    # --out naming a file is refused before anything runs.
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main([*bench, "--set", "s", "--out", str(afile)]) == 2
    assert f"--out {afile} is a file; give a folder." in capsys.readouterr().err
