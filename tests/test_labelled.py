"""Labelled examples: row layout for texts and pairs, truncation, label spaces, one finite
eval pass, and opening labelled files and the bundled fortunes set."""
import dataclasses
import json

import numpy as np
import pytest

from ptft_jax.config.schema import DataConfig
from ptft_jax.data.labelled import Examples, LabelSpace, open_examples, predict_examples
from ptft_jax.data.opening import open_documents
from ptft_jax.data.tokenizer import load_tokenizer, train_tokenizer


def _stream(*docs):
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return np.concatenate([np.asarray(d, np.int32) for d in docs]), offsets


def test_rows_for_single_texts_pairs_and_decoders():
    single = Examples(_stream([10, 11, 12]), None, np.array([1]), 8, cls_id=2, sep_id=3)
    row = single.rows([0])
    assert row["tokens"][0].tolist() == [2, 10, 11, 12, 3, 0, 0, 0]
    assert row["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert row["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert row["type_ids"][0].tolist() == [0] * 8 and row["label"].tolist() == [1]
    pair = Examples(_stream([10, 11]), _stream([20, 21, 22]), None, 10, cls_id=2, sep_id=3)
    row = pair.rows([0])
    assert row["tokens"][0].tolist() == [2, 10, 11, 3, 20, 21, 22, 3, 0, 0]
    assert row["type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert "label" not in row
    decoder = Examples(_stream([10, 11]), None, None, 4, cls_id=None, sep_id=9)
    assert decoder.rows([0])["tokens"][0].tolist() == [10, 11, 9, 0]


def test_truncation_cuts_the_longer_text_first_and_is_counted():
    pair = Examples(_stream(list(range(100, 110)), [1, 1], [5]), _stream([20, 21], list(range(
        200, 210)), [6]), None, 9, cls_id=2, sep_id=3)  # room for 6 text tokens
    rows = pair.rows([0, 1, 2])["tokens"].tolist()
    assert rows[0] == [2, 100, 101, 102, 103, 3, 20, 21, 3]  # the long first text is cut
    assert rows[1] == [2, 1, 1, 3, 200, 201, 202, 203, 3]  # the long second text is cut
    assert rows[2] == [2, 5, 3, 6, 3, 0, 0, 0, 0]
    assert pair.truncated == 2


def test_label_spaces_and_unseen_labels():
    space = LabelSpace.from_labels("classification", ["pos", "neg", "pos"])
    assert space.names == ("neg", "pos") and space.encode(["pos"], "x").tolist() == [1]
    with pytest.raises(ValueError, match="'maybe' .* not in the training labels"):
        space.encode(["neg", "maybe"], "split 'validation'")
    multi = LabelSpace.from_labels("multi_label", [["a", "b"], "c", []])
    assert multi.encode(["a,c"], "x").tolist() == [[1, 0, 1]]
    reg = LabelSpace.from_labels("regression", [0.5, 2])
    assert reg.num_outputs == 1 and reg.encode(["1.5"], "x").tolist() == [1.5]
    for bad in ("nan", float("inf"), "1e39"):  # would make every batch holding it skipped
        with pytest.raises(ValueError, match=r"example\(s\) \[1\] are not finite float32"):
            reg.encode(["1.5", bad], "split 'validation'")
    with pytest.raises(ValueError, match="at least 2"):
        LabelSpace.from_labels("classification", ["x", "x"])


def test_a_json_label_column_mixing_numbers_and_text_is_refused(tmp_path):
    """Arrow reads such a column as JSON text (1 -> '1', "one" -> '"one"'): the quoted names
    would become classes of their own, and 1 and "1" one class."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": [1, "1", "one"][i % 3]}) + "\n"
                            for i in range(9)))
    documents = open_documents(DataConfig(corpus=str(path), label_column="label"))
    raw = documents.labels(0, len(documents))
    with pytest.raises(ValueError, match=r"mixed\.jsonl.* mix numbers and text .*\"one\""):
        LabelSpace.from_labels("classification", raw, f"the labels of {path}")


def test_batches_cover_every_example_once_with_a_padded_last_batch():
    data = Examples(_stream(*[[10 + i] for i in range(11)]), None, np.arange(11), 4, 2, 3)
    batches = list(data.batches(4))
    assert len(batches) == data.num_batches(4) == 3
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.tolist() == [1] * 11 + [0]
    seen = np.concatenate([b["label"][b["weight"] > 0] for b in batches])
    assert seen.tolist() == list(range(11))
    assert batches[-1]["segment_ids"][-1].sum() > 0  # padding rows are real rows, weight 0


def _files(tmp_path):
    train = [{"text": f"the cat sat number {i}", "label": "cat"} for i in range(6)] + \
            [{"text": f"a dog ran far {i}", "label": "dog"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "pairs.csv").write_text("q,a,label\nwho sat,the cat,1\nwho ran,a dog,0\n")
    tok = train_tokenizer("encoder", [r["text"] for r in train] + ["who sat ran"], 200)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_open_examples_from_files_and_pairs(tmp_path):
    tokenizer = _files(tmp_path)
    cfg = DataConfig(corpus=str(tmp_path / "train.jsonl"), label_column="label", seq_len=16)
    examples, space = open_examples(cfg, "train", tokenizer, tmp_path / "cache",
                                    "classification", None, "encoder", progress=False)
    assert len(examples) == 12 and space.names == ("cat", "dog")
    tok = load_tokenizer(tokenizer)
    row = examples.rows([0])["tokens"][0]
    assert tok.decode([int(t) for t in row if t]).startswith("the cat sat")
    pairs = DataConfig(corpus=str(tmp_path / "pairs.csv"), text_column="q",
                       text_pair_column="a", label_column="label", seq_len=16)
    examples, space = open_examples(pairs, "train", tokenizer, tmp_path / "cache",
                                    "classification", None, "encoder", progress=False)
    assert space.names == ("0", "1") and examples.rows([0])["type_ids"][0].sum() > 0
    predicted = predict_examples(["the cat"], tok, 16, "encoder")
    assert len(predicted) == 1 and predicted.labels is None


def test_keep_labels_and_per_class_select_text_examples(tmp_path):
    tokenizer = _files(tmp_path)
    rows = [{"text": f"the cat sat number {i}", "label": "cat"} for i in range(6)] + \
           [{"text": f"a dog ran far {i}", "label": "dog"} for i in range(5)] + \
           [{"text": f"who sat {i}", "label": "owl"} for i in range(4)]
    (tmp_path / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tokenizer)

    def texts(examples):
        return [tok.decode([int(t) for t in row if t]) for row in
                examples.rows(np.arange(len(examples)))["tokens"]]
    cfg = DataConfig(corpus=str(tmp_path / "three.jsonl"), label_column="label", seq_len=16,
                     keep_labels=["owl", "dog"], per_class=3, shuffle_seed=4)
    examples, space = open_examples(cfg, "train", tokenizer, tmp_path / "cache",
                                    "classification", None, "encoder", progress=False,
                                    per_class=3)
    assert space.names == ("dog", "owl") and len(examples) == 6
    short = dataclasses.replace(cfg, seq_len=5)  # [CLS] + 3 tokens + [SEP]: dogs are cut
    cut, _ = open_examples(short, "train", tokenizer, tmp_path / "cache", "classification",
                           None, "encoder", progress=False, per_class=3)
    assert cut.truncated == int(np.sum(cut.labels == 0)) == 3  # counted on the subset
    assert sorted(examples.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    chosen = texts(examples)
    assert all(("dog" in t) == (label == 0) for t, label in zip(chosen, examples.labels))
    source = [r["text"] for r in rows]
    assert all(t in source for t in chosen) and chosen == sorted(chosen, key=source.index)
    again, _ = open_examples(cfg, "train", tokenizer, tmp_path / "cache", "classification",
                             None, "encoder", progress=False, per_class=3)
    assert texts(again) == chosen  # the same examples for the same seed
    other, _ = open_examples(dataclasses.replace(cfg, shuffle_seed=5), "train", tokenizer,
                             tmp_path / "cache", "classification", None, "encoder",
                             progress=False, per_class=3)
    assert texts(other) != chosen
    # Evaluation keeps the classes but every example of them; a missing class is named.
    evaluation, _ = open_examples(cfg, "train", tokenizer, tmp_path / "cache",
                                  "classification", space, "encoder", progress=False)
    assert len(evaluation) == 9
    with pytest.raises(ValueError, match=r"data.keep_labels: \['emu'\] are not labels"):
        open_examples(dataclasses.replace(cfg, keep_labels=["emu", "dog"]), "train", tokenizer,
                      tmp_path / "cache", "classification", None, "encoder", progress=False)


def test_missing_label_column_and_empty_split_are_clear_errors(tmp_path):
    tokenizer = _files(tmp_path)
    cfg = DataConfig(corpus=str(tmp_path / "train.jsonl"), label_column="category")
    with pytest.raises(ValueError, match="no column 'category'"):
        open_examples(cfg, "train", tokenizer, tmp_path / "c", "classification", None,
                      "encoder", progress=False)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " ", "label": "cat"}) + "\n")
    cfg = DataConfig(corpus=str(tmp_path / "empty.jsonl"), label_column="label")
    with pytest.raises(ValueError, match="no examples|holds no text"):
        open_examples(cfg, "train", tokenizer, tmp_path / "c", "classification", None,
                      "encoder", progress=False)


def test_bundled_fortunes_has_two_splits_with_the_same_labels():
    cfg = DataConfig(corpus="bundled:fortunes", label_column="label")
    train, validation = open_documents(cfg, "train"), open_documents(cfg, "validation")
    train_labels = set(train.labels(0, len(train)))
    assert len(train_labels) >= 6 and len(train) > 4 * len(validation)
    assert set(validation.labels(0, len(validation))) <= train_labels
    with pytest.raises(ValueError, match="splits train, validation"):
        open_documents(cfg, "test")
