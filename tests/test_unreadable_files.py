"""Every file a command reads goes through config/reading.py: a file that is not UTF-8, not
YAML / JSON, or of the wrong shape is one line naming the file and the line (the file's own,
blank lines counted), before anything compiles or is written. The commands run in this
process: each refusal comes before any work."""
from pathlib import Path

import pytest
import yaml

from ptft_jax.cli import main
from ptft_jax.config.load import load_config
from ptft_jax.config.reading import UnreadableFile, read_json, read_jsonl, read_text, read_yaml
from ptft_jax.config.schema import DataConfig
from ptft_jax.data.opening import open_documents
from ptft_jax.data.pairs import FilePairs

REPO = Path(__file__).resolve().parent.parent
FINETUNE = "configs/finetune_fortunes_full.yaml"
FUSION = "configs/finetune_emoji_fusion.yaml"

# Line 3 holds a Latin-1 byte; line 4 breaks YAML; line 7 of the JSONL (after blank lines)
# breaks JSON.
LATIN = b"train:\n  steps: 2\nnote: caf\xc9\n"
BAD_YAML = b"train:\n  steps: 2\nmodel: [1, 2\nrun_dir: x\n"
BAD_JSONL = b'{"text": "a"}\n\n\n{"text": "b"}\n\n\n{"text": c}\n{"text": "d"}\n'


FIXTURES_GPT2 = Path(__file__).resolve().parent / "fixtures" / "hf" / "gpt2_model"

def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_dir(path: Path, config: str, labels: bytes | None = None) -> Path:
    """A run directory as far as reading it goes: config.yaml, a tokenizer (any: the labels
    are read first) and labels.json."""
    text = yaml.safe_dump(load_config(config).to_dict(), sort_keys=False)
    put(path / "config.yaml", text.encode())
    put(path / "tokenizer.json", (FIXTURES_GPT2 / "tokenizer.json").read_bytes())
    if labels is not None:
        put(path / "labels.json", labels)
    return path


def refused(capsys, argv, path: Path, where: str) -> str:
    """Runs `ptft ARGV`; its error must be one line naming `path` and `where` ("line 7")."""
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: {where}" in err, err
    return err


def test_each_kind_of_file_is_named_with_its_line(tmp_path, capsys):
    latin, bad = put(tmp_path / "latin.yaml", LATIN), put(tmp_path / "bad.yaml", BAD_YAML)
    jsonl = put(tmp_path / "bad.jsonl", BAD_JSONL)
    text = put(tmp_path / "latin.txt", b"one\ntwo\ncaf\xe9\n")
    inputs = put(tmp_path / "in.txt", b"a text\n")
    out = tmp_path / "out"
    # The config file, and the other YAML files commands take.
    for argv in (["pretrain", "--config"], ["finetune", "--config"],
                 ["sweep", "--config", FINETUNE, "--dir", out, "--space"],
                 ["sweep", "--space", "configs/sweep_fortunes_space.yaml", "--dir", out,
                  "--config"],
                 ["experiment", "pretrain-vs-end-to-end", "--config"],
                 ["bench", "--no-torch", "--out", out, "--cases-file"],
                 ["bench", "--finetune", "--no-torch", "--out", out, "--cases-file"],
                 ["bench", "--pipeline", "--out", out, "--cases-file"]):
        assert "not UTF-8" in refused(capsys, [*argv, latin], latin, "line 3")
        err = refused(capsys, [*argv, bad], bad, "line 4, column 8")
        assert "not valid YAML" in err and "line 3" in err  # where the list began
    assert not out.exists()
    # A run's config.yaml, for every command that reads a run.
    broken = put(tmp_path / "broken" / "config.yaml", LATIN).parent
    for argv in (["predict", broken, "-i", inputs], ["eval", broken],
                 ["export", broken, out], ["export", broken, out, "--format", "hf"],
                 ["embed", broken, "-i", inputs]):
        refused(capsys, argv, broken / "config.yaml", "line 3")
    # A run's labels.json: not JSON, or not what ptft wrote.
    run = run_dir(tmp_path / "run", FINETUNE, b'{"kind": "classification",\n "names": [,]}')
    refused(capsys, ["predict", run, "-i", inputs], run / "labels.json", "line 2, column 12")
    refused(capsys, ["export", run, out, "--format", "hf"], run / "labels.json", "line 2")
    put(run / "labels.json", b'{"names": 3}\n')
    assert "must hold" in refused(capsys, ["predict", run, "-i", inputs], run / "labels.json",
                                  "holds")
    put(run / "labels.json", b'{"kind": "classification", "names": ["a", "b"]}\n')
    # The predict / embed input: text, JSON lines, a list of image files.
    for command in ("predict", "embed"):
        refused(capsys, [command, run, "-i", text], text, "line 3")
        refused(capsys, [command, run, "-i", jsonl], jsonl, "line 7, column 10")
    no_text = put(tmp_path / "no_text.jsonl", b'{"text": "a"}\n\n{"txt": "b"}\n')
    assert "'text'" in refused(capsys, ["predict", run, "-i", no_text], no_text, "line 3")
    # An image-text pairs file, read before the run is loaded.
    fusion = run_dir(tmp_path / "fusion", FUSION, b'{"kind": "classification", "names": '
                                                  b'["a", "b"]}')
    pairs = put(tmp_path / "pairs.jsonl", BAD_JSONL.replace(b'"text": "a"',
                                                             b'"image": "x.png", "text": "a"'))
    refused(capsys, ["predict", fusion, "-i", pairs], pairs, "line 7")
    assert not out.exists()


def test_missing_files_folders_and_wrong_shapes_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert "configs/" in refused(capsys, ["pretrain", "--config", missing], missing,
                                 "no such file")
    refused(capsys, ["pretrain", "--config", tmp_path], tmp_path, "is a folder")
    a_list = put(tmp_path / "list.yaml", b"# steps\n\n- 1\n- 2\n")
    err = refused(capsys, ["pretrain", "--config", a_list], a_list, "line 3: holds a list")
    assert "a mapping of keys" in err
    no_sets = put(tmp_path / "cases.yaml", b"defaults: {}\n")
    assert "'sets:'" in refused(capsys, ["bench", "--cases-file", no_sets], no_sets, "no ")
    nul = put(tmp_path / "nul.yaml", b"train:\n  steps: \x00\n")
    refused(capsys, ["pretrain", "--config", nul], nul, "line 2")


def test_a_bad_json_line_in_data_is_named_with_its_line(tmp_path):
    """JSON lines data (data.corpus, image-text pairs): the file and its own line number."""
    data = put(tmp_path / "data.jsonl", BAD_JSONL)
    with pytest.raises(UnreadableFile, match=rf"^{data}: line 7, column 10: not valid JSON"):
        len(open_documents(DataConfig(corpus=str(data))))
    with pytest.raises(UnreadableFile, match=rf"^{data}: line 7"):
        FilePairs(data, "image", "text", None)
    latin = put(tmp_path / "pairs.csv", b"image,text\na.png,one\nb.png,caf\xe9\n")
    with pytest.raises(UnreadableFile, match=rf"^{latin}: line 3: byte 0xe9 at offset 30"):
        FilePairs(latin, "image", "text", None)
    one_doc = put(tmp_path / "doc.json", b'{"text": ["a", "b"],\n "label": [0, ]}\n')
    with pytest.raises(UnreadableFile, match=rf"^{one_doc}: line 2, column 15"):
        len(open_documents(DataConfig(corpus=str(one_doc))))


def test_the_readers_read_valid_files_as_before(tmp_path):
    """What a valid file gives is what yaml / json gave: every shipped config, JSON, JSON
    lines with blank lines and Windows line endings."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert read_yaml(path, "a config") == (yaml.safe_load(path.read_text()) or {}), path
    assert read_yaml(put(tmp_path / "empty.yaml", b"# nothing\n"), "x") == {}
    assert read_yaml(put(tmp_path / "l.yaml", b"- a\n"), "x", list) == ["a"]
    assert read_json(put(tmp_path / "a.json", b'{"a": [1, 2]}'), "x") == {"a": [1, 2]}
    rows = list(read_jsonl(put(tmp_path / "r.jsonl", b'\n{"a": 1}\r\n\n{"a": "\xc3\xa9"}'),
                           "x"))
    assert rows == [(2, {"a": 1}), (4, {"a": "\u00e9"})]
    assert read_text(put(tmp_path / "t.txt", b"a\r\nb\n"), "x") == "a\nb\n"
    with pytest.raises(UnreadableFile, match=r"line 1: holds a list; each line of x must hold "
                                             r"a JSON object"):
        list(read_jsonl(put(tmp_path / "l.jsonl", b"[1]\n"), "x"))
    with pytest.raises(UnreadableFile, match=r"e\.json: the file is empty"):
        read_json(put(tmp_path / "e.json", b" \n"), "x")
