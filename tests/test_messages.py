"""Messages that used to mislead: each names the path or tensor at fault and what to do, in one
line, before anything is built or written. Most run the command line in this process on
folders made here (a run directory is a config.yaml and step folders, enough for a refusal)."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from ptft_jax.cli import main
from ptft_jax.config.load import load_config
from ptft_jax.core.files import claim_folder
from ptft_jax.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "hf"
FORTUNES = "configs/finetune_fortunes_full.yaml"


def _fake_run(path: Path, config: str, *overrides) -> Path:
    """A folder that looks like a ptft run from outside: its config and one step folder."""
    (path / "checkpoints" / "1" / "params").mkdir(parents=True)
    cfg = load_config(config, [f"run_dir={path}", *overrides])
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (path / "labels.json").write_text('{"kind": "classification", "names": ["a", "b"]}')
    return path


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_init_from_that_is_missing_not_a_run_or_of_the_wrong_kind(tmp_path, capsys):
    image_run = _fake_run(tmp_path / "vit_run", "configs/finetune_fmnist_vit.yaml")
    (tmp_path / "notes").mkdir()
    for source, words in ((tmp_path / "nowhere", "does not exist"),
                          (tmp_path / "notes", "is not a ptft run"),
                          (image_run, "is a run of an image model (model.kind vit)")):
        run = tmp_path / "ft"
        assert main(["finetune", "--config", FORTUNES, f"run_dir={run}",
                     f"finetune.init_from={source}"]) == 2
        _one_line_error(capsys, "finetune.init_from", str(source), words)
        assert not run.exists()


def test_a_labelled_eval_file_beside_the_shipped_eval_split(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one two", "label": "a"}\n')
    run = tmp_path / "ft"
    # Local files are one split: data.eval_corpus is the way to name the eval file.
    assert main(["finetune", "--config", FORTUNES, f"run_dir={run}", f"data.corpus={data}",
                 "data.tokenizer=tests/fixtures/hf/bert_model/vocab.txt"]) == 2
    _one_line_error(capsys, "data.eval_split", "data.eval_corpus=FILE")
    assert not run.exists()


@pytest.mark.parametrize("fault", ["nan", "int32"])
def test_hf_weights_that_are_not_finite_floats_name_the_tensor(tmp_path, capsys, fault):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "bert_model", model)
    tensors = load_file(str(model / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith("attention.self.query.weight"))
    tensors[name] = tensors[name].copy()
    if fault == "nan":
        tensors[name][0, 0] = np.nan
    else:
        tensors[name] = (tensors[name] * 100).astype(np.int32)
    save_file(tensors, str(model / "model.safetensors"))
    text = tmp_path / "texts.txt"
    text.write_text("hello world\n")
    assert main(["embed", str(model), "-i", str(text)]) == 2
    _one_line_error(capsys, name, "non-finite" if fault == "nan" else "int32")


def test_image_runs_where_text_is_needed(tmp_path, capsys):
    run = _fake_run(tmp_path / "vit_run", "configs/finetune_fmnist_vit.yaml")
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "hf"]) == 2
    _one_line_error(capsys, "vit", "--format ptft")
    text = tmp_path / "texts.txt"
    text.write_text("hello\n")
    assert main(["embed", str(run), "-i", str(text)]) == 2
    _one_line_error(capsys, str(run), "text encoder or decoder")
    assert not (tmp_path / "out").exists()


def test_tokenizer_out_names_the_path_given(tmp_path, capsys):
    folder = tmp_path / "tokenizers"
    folder.mkdir()
    for out, words in ((folder, "is a folder"), (tmp_path / "no" / "tok.json",
                                                 "does not exist")):
        assert main(["tokenizer", "train", "--config", "configs/pretrain_tiny_mlm.yaml",
                     "--out", str(out)]) == 2
        _one_line_error(capsys, f"--out {out}", words)
    assert not any(folder.iterdir()) and not (tmp_path / "no").exists()


def test_sigterm_during_start_up_says_nothing_was_started(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ptft_jax.cli", "pretrain", "--config",
                             "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
                             "train.progress=false"], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not run.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the run directory appears with the data cache: before any step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err[-2000:]
    assert "stopped by SIGTERM during start-up" in err and "nothing was trained" in err, err
    assert not (run / "checkpoints").exists()


def test_the_three_command_workflow_shares_one_run_dir(tmp_path, small_corpus, capsys):
    """README's "Your own data": tokenizer, cache, then pretraining, in one run directory."""
    common = ["--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={tmp_path / 'run'}",
              f"data.corpus={small_corpus}", "data.tokenizer_vocab_size=512", "data.seq_len=32",
              "model.max_len=32"]
    assert main(["tokenizer", "train", *common]) == 0
    run, saved = tmp_path / "run", tmp_path / "run" / "tokenizer.json"
    # Until the run saves a step, a tokenizer made for another config is refused, naming what
    # changed (a run that failed early must not hand its tokenizer to the next one).
    other = tmp_path / "other.txt"
    other.write_text("a corpus of another kind\n" * 50)
    capsys.readouterr()
    for command, change, key in [("data", f"data.corpus={other}", "data.corpus"),
                                 ("pretrain", "data.tokenizer_vocab_size=600",
                                  "data.tokenizer_vocab_size")]:
        argv = [command, "prepare", *common, change] if command == "data" else \
            [command, *common, change, "train.steps=1", "train.global_batch=8"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{key} was" in err and str(saved) in err, err
        assert "new run_dir" in err and f"data.tokenizer={saved}" in err, err
    assert sorted(p.name for p in run.iterdir()) == [".ptft", "tokenizer.json",
                                                   "tokenizer_source.json"]
    elsewhere = [f"data.corpus={other}", f"data.cache_dir={tmp_path / 'elsewhere'}"]
    assert main(["data", "prepare", *common, *elsewhere, f"data.tokenizer={saved}"]) == 0
    assert main(["data", "prepare", *common]) == 0
    # A save that a kill interrupted is all its checkpoints/ holds: said, then started afresh.
    (run / "checkpoints" / "1.orbax-checkpoint-tmp-1765000000").mkdir(parents=True)
    capsys.readouterr()
    assert main(["pretrain", *common, "train.steps=1", "train.global_batch=8",
                 "train.progress=false"]) == 0, capsys.readouterr().err[-2000:]
    err = capsys.readouterr().err
    assert "only an interrupted save of step 1 (removed); training starts at step 0" in err, err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["1"]
    # Once it has saved a step the run keeps its tokenizer, whatever corpus comes next.
    assert main(["data", "prepare", *common, *elsewhere, "--overwrite"]) == 0


def test_a_run_dir_in_use_by_another_process_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"),
        str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
                     f"run_dir={run}"]) == 2
        _one_line_error(capsys, "run_dir", "in use by another ptft process")
    finally:
        holder.kill()
    assert not any(run.iterdir())


def test_inputs_that_would_misalign_or_mislead_are_refused(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  steps: 3\nmodel:\n  preset: bert-tiny\ntrain:\n  steps: 4\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    _one_line_error(capsys, f"{config}: line 5", "'train' is given twice (first at line 1)")
    with pytest.raises(SystemExit):  # argparse's one line
        main(["pretrain", "-c", str(config), "-c", "configs/pretrain_tiny_mlm.yaml"])
    assert "is given twice" in capsys.readouterr().err
    texts = tmp_path / "gap.txt"
    texts.write_text("first\n\nthird\n")
    assert main(["embed", str(FIXTURES / "bert_model"), "-i", str(texts)]) == 2
    _one_line_error(capsys, f"{texts}: line 2 is empty")
    texts.write_text("first\nsecond\n")
    assert main(["embed", str(FIXTURES / "bert_model"), "-i", str(texts), "-o",
                 str(tmp_path / "vectors.csv")]) == 2
    _one_line_error(capsys, "vectors.csv", ".npy")
    assert not (tmp_path / "vectors.csv").exists()


def test_settings_a_command_would_ignore_or_misread_are_refused(tmp_path, pretrained, capsys):
    vocab = str(FIXTURES / "bert_model" / "vocab.txt")
    cases = [  # (command line, words the one line holds)
        (["export", str(pretrained), str(tmp_path / "out")], ["pretraining run", "--format hf"]),
        (["finetune", "--config", FORTUNES, "data.keep_labels=[food]"], ["data.keep_labels"]),
        (["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", "mesh.parallelism=pmap",
          "mesh.tensor=2"], ["mesh.tensor=2", "mesh.parallelism=jit"]),
        (["finetune", "--config", FORTUNES, f"finetune.init_from={pretrained}",
          f"data.tokenizer={vocab}"], ["data.tokenizer", "leave data.tokenizer null"]),
    ]
    for argv, words in cases:
        run = tmp_path / "run"
        assert main([*argv, f"run_dir={run}"] if "--config" in argv else argv) == 2, argv
        _one_line_error(capsys, *words)
        assert not (tmp_path / "out").exists()
        shutil.rmtree(run, ignore_errors=True)  # a refused data check may leave its cache
    # Another kind of model into a run directory with checkpoints: named before its tokenizer.
    before = sorted(p.name for p in pretrained.rglob("*"))
    assert main(["pretrain", "--config", "configs/pretrain_tiny_clm.yaml",
                 f"run_dir={pretrained}"]) == 2
    _one_line_error(capsys, "checkpoints of model.kind encoder", "model.kind is decoder")
    assert sorted(p.name for p in pretrained.rglob("*")) == before
    # The tokenizer an earlier run left in the run_dir, not the component's: named as such.
    run = claim_folder(tmp_path / "run", "run", "run_dir")
    (run / "tokenizer.json").write_text(load_tokenizer(vocab).to_str())
    assert main(["finetune", "--config", FORTUNES, f"finetune.init_from={pretrained}",
                 f"run_dir={run}"]) == 2
    _one_line_error(capsys, f"{run / 'tokenizer.json'} (left in this run_dir", "new run_dir")
    # Refused at the data, after the run_dir was taken: the empty folder does not stay.
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    assert main(["finetune", "--config", FORTUNES, f"run_dir={tmp_path / 'new'}",
                 f"finetune.init_from={pretrained}", f"data.corpus={data}", "data.format=csv",
                 "data.eval_split=null"]) == 2
    _one_line_error(capsys, "is read as CSV", "data.format=jsonl")
    assert not (tmp_path / "new").exists()
