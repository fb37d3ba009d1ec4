"""What ptft writes (core/files.py): whole files or none, even under a kill or a full disk,
and nothing of the user's deleted or replaced: folders ptft did not make are refused, an
output never replaces an input or an existing file unasked. Refusals come before any work,
so most of these run the command line in this process."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ptft_jax.cli import main
from ptft_jax.config.schema import ConfigError
from ptft_jax.core.files import (MARKER, TMP_SUFFIX, atomic_write_json, building_folder,
                                 check_ownable, claim_folder, writing_text)

REPO = Path(__file__).resolve().parent.parent
MLM = "configs/pretrain_tiny_mlm.yaml"


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what "untouched" is compared on."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _users_folder(path: Path) -> Path:
    (path / "partial").mkdir(parents=True)
    (path / "config.yaml").write_text("my: own settings\n")
    (path / "partial" / "notes.txt").write_text("half of my thesis\n")
    return path


def test_a_failed_or_killed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with writing_text(target) as f:
            f.write("new, half")
            raise RuntimeError("the writer fails")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused, nothing written
        atomic_write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not (tmp_path / "m.json").exists()
    # Killed mid-write: the old file stays whole; the next write is not blocked.
    script = ("import sys, time; from pathlib import Path; "
              "from ptft_jax.core.files import writing_text\n"
              "with writing_text(Path(sys.argv[1])) as f:\n"
              "    f.write('new, half'); f.flush(); print('writing', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old\n"
    with writing_text(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n"


def test_an_unwritable_output_folder_is_named_not_its_temporary_sibling(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permissions; an immutable folder stops it
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("no chattr +i here, and root writes into any folder")
        undo = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        undo = ["chmod", "755", str(locked)]
    try:
        with pytest.raises(OSError) as raised:
            with building_folder(locked / "out", "export"):
                pass
    finally:
        subprocess.run(undo, check=True)
    assert raised.value.filename == str(locked / "out"), raised.value
    assert f"cannot create a folder in {locked}" in str(raised.value)
    assert os.listdir(locked) == []


def test_folders_of_the_user_are_refused_and_left_untouched(tmp_path, capsys):
    user = _users_folder(tmp_path / "mine")
    before = _snapshot(user)
    # run_dir: the user's config.yaml would be replaced; data.cache_dir: partial/ deleted.
    for key in ("run_dir", "data.cache_dir"):
        other = [f"run_dir={tmp_path / 'run'}"] if key != "run_dir" else []
        assert main(["pretrain", "--config", MLM, f"{key}={user}", *other]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{key}: {user}" in err and MARKER in err, err
    sweep = ["sweep", "--config", "configs/finetune_fortunes_full.yaml", "--space",
             "configs/sweep_fortunes_space.yaml", "--dir"]
    assert main([*sweep, str(user)]) == 2 and f"--dir: {user}" in capsys.readouterr().err
    assert main([*sweep, str(user / "config.yaml")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert _snapshot(user) == before and not (tmp_path / "run").exists()
    # An empty folder is taken and marked; a marked one is ptft's, of its kind only.
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_folder(empty, "run", "run_dir")
    check_ownable(empty, "run", "run_dir")
    with pytest.raises(ConfigError, match="is a ptft run folder, not a token cache folder"):
        check_ownable(empty, "token cache", "data.cache_dir")


def test_outputs_never_replace_inputs_or_existing_files(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\nanother\n")
    run = tmp_path / "no_run"  # the output is checked before the run is even opened
    cases = {  # argv -> what the one-line error says
        ("predict", str(run), "-i", str(texts), "-o", str(texts)): "is the input",
        ("predict", str(run), "-i", str(texts), "-o", str(texts), "--overwrite"):
            "is the input",
        ("predict", str(run), "-o", str(texts)): "already exists",
        ("embed", str(run), "-o", str(texts)): "already exists",
        ("predict", str(run), "-o", str(tmp_path / "missing" / "p.jsonl")): "does not exist",
        ("predict", str(run), "-o", str(tmp_path)): "is a folder",
        ("export", str(run), str(texts)): "is a file",
        ("export", str(run), str(texts), "--format", "hf"): "is a file",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert texts.read_text() == "one text\nanother\n"


def _limited(*args, kib):
    """`ptft ARGS` with every file it writes limited to `kib` KiB (EFBIG past it): a full
    disk, as a process sees it, without mounting one."""
    limit = ["bash", "-c", f"trap '' XFSZ; ulimit -f {kib}; exec \"$@\"", "bash"] if kib else []
    return subprocess.run([*limit, sys.executable, "-m", "ptft_jax.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_at_the_tokenizer_and_the_cache_is_one_line(tmp_path, small_corpus):
    # A run_dir of its own (beside tmp_path, which must stay empty): the config's runs/tiny_mlm
    # may hold a user's run, with another tokenizer, in a working checkout.
    common = ["--config", MLM, f"data.corpus={small_corpus}", "data.tokenizer_vocab_size=1000",
              "data.num_workers=1", f"run_dir={tmp_path.parent / (tmp_path.name + '-run')}"]
    tok = tmp_path / "tok.json"
    result = _limited("tokenizer", "train", *common, "--out", str(tok), kib=8)
    assert result.returncode == 4, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tok) in lines[0] and "Free some space" in lines[0], lines
    assert os.listdir(tmp_path) == []  # no tokenizer, no temporary file
    assert _limited("tokenizer", "train", *common, "--out", str(tok), kib=0).returncode == 0

    cache = tmp_path / "cache"
    prepare = ["data", "prepare", *common, f"data.tokenizer={tok}", f"data.cache_dir={cache}"]
    result = _limited(*prepare, kib=16)
    assert result.returncode == 4, result.stderr[-2000:]
    lines = [x for x in result.stderr.strip().splitlines() if x.startswith("ptft")]
    assert len(lines) == 1 and "Free some space" in lines[0] and "Traceback" not in \
        result.stderr, result.stderr[-2000:]
    assert not (cache / "meta.json").exists()  # not committed
    assert not list(cache.rglob(f"*{TMP_SUFFIX}"))
    result = _limited(*prepare, kib=0)  # with room again: it finishes
    assert result.returncode == 0 and "done:" in result.stdout, result.stderr[-2000:]
    assert json.loads((cache / MARKER).read_text())["kind"] == "token cache"
