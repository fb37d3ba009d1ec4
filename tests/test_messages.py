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
    assert proc.returncode == -signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM during start-up" in err and "nothing was trained" in err, err
    assert not (run / "checkpoints").exists()
