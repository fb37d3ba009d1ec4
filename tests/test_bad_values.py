"""Values that cannot train are refused before anything starts, by the schema's one walk
(config/ranges.py: finite numbers, each key's range) and the few rules that relate keys
(config/validate.py), with one line naming the key; nothing is written. Every shipped
config still validating is tests/test_config.py's."""
import dataclasses
import math
import typing
from pathlib import Path

import pytest

from ptft_jax.cli import main
from ptft_jax.config import schema
from ptft_jax.config.load import load_config
from ptft_jax.config.ranges import RANGES
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate

FINETUNE = "configs/finetune_fortunes_scratch.yaml"
HF_ENCODER = "tests/fixtures/hf/bert_model"  # max_len (max_position_embeddings) 32

BAD = [  # overrides of FINETUNE, and what the one-line refusal must say
    (["optim.learning_rate=nan"], "'optim.learning_rate' is nan; it must be finite and positive"),
    (["optim.learning_rate=inf"], "'optim.learning_rate' is inf"),
    (["optim.learning_rate=-.inf"], "'optim.learning_rate' is -inf"),
    (["finetune.lora_alpha=nan"], "'finetune.lora_alpha' is nan"),
    (["objective.siglip_bias=.nan"], "'objective.siglip_bias' is nan"),  # unbounded, yet finite
    (["augment.std=[0.5, .inf]"], r"'augment.std\[1\]' is inf"),
    (["finetune.lr_multipliers=[['x', .nan]]"], r"'finetune.lr_multipliers\[0\]\[1\]' is nan"),
    (["optim.eps=0"], "'optim.eps' is 0.0; it must be positive"),
    (["optim.end_lr_ratio=-1"], "'optim.end_lr_ratio' is -1.0; it must be non-negative"),
    (["model.type_vocab_size=-1"], "'model.type_vocab_size' is -1; it must be non-negative"),
    (["towers.text.model.num_layers=-2"], "'towers.text.model.num_layers' is -2"),
    (["train.seed=-1"], "'train.seed' is -1"),
    (["data.per_class=-3"], "'data.per_class' is -3"),
    (["model.norm_eps=0"], r"'model.norm_eps' is 0.0; it must be in \(0, 1\), or null"),
    (["model=5"], "'model' is a section, not a value .* e.g. model.preset=..."),
    (["towers.image=fast"], "'towers.image' is a section"),
    (["data.label_column=text"], "data.label_column and data.text_column both name the column "
                                 "'text'; set data.label_column to the column that holds"),
    (["data.text_pair_column=text"], "data.text_pair_column and data.text_column"),
    (["finetune.lora_rank=4", "finetune.linear_probe=true"],
     "finetune.linear_probe trains the head only; finetune.lora_rank .* finetune.lora_rank=0"),
    (["finetune.unfreeze=gradual", "finetune.linear_probe=true"], "finetune.unfreeze"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_values_that_cannot_train_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(load_config(FINETUNE, overrides), 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["mesh.data=-1"], ["objective.siglip_bias=-10"], ["model.type_vocab_size=0"],
    ["finetune.lora_rank=0"], ["optim.clip_norm=0"], ["train.loss_spike_factor=0"],
    ["eval.every=0"], ["checkpoint.every=0"], ["optim.end_lr_ratio=0"], ["model.norm_eps=null"],
    ["model.vocab_size=null"], ["objective.loss_chunk=0"], ["finetune.linear_probe=true"],
    ["model=null"],
])
def test_off_and_rest_values_still_validate(overrides):
    validate(load_config(FINETUNE, overrides), 1)


def test_a_section_given_a_scalar_in_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("".join(line for line in Path(FINETUNE).read_text().splitlines(True)
                            if not line.startswith(("optim:", " "))) + "optim: 5\n")
    with pytest.raises(ConfigError, match="'optim' is a section, not a value \\(got 5\\)"):
        load_config(path)


def test_the_walk_covers_a_config_built_in_code():
    cfg = load_config(FINETUNE, [])
    cfg.towers.image.model.dropout = math.nan
    with pytest.raises(ConfigError, match="'towers.image.model.dropout' is nan"):
        validate(cfg, 1)


def test_every_range_names_a_field_of_its_section():
    for cls, rules in RANGES.items():
        assert set(rules) <= {f.name for f in dataclasses.fields(cls)}, cls
    floats = {(name, f.name) for name, cls in vars(schema).items()
              if dataclasses.is_dataclass(cls) and isinstance(cls, type)
              for f in dataclasses.fields(cls)
              if typing.get_type_hints(cls)[f.name] in (float, float | None)
              and f.name not in RANGES.get(cls, {})}
    assert floats == {("ObjectiveConfig", "siglip_bias")}  # the one deliberately unbounded


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=nan"], "'optim.learning_rate' is nan"),
    (["optim.eps=0"], "'optim.eps' is 0.0"),
    (["model=5"], "'model' is a section"),
    (["data.label_column=text"], "data.label_column and data.text_column"),
    (["finetune.lora_rank=4", "finetune.linear_probe=true"], "finetune.linear_probe"),
])
def test_the_command_refuses_before_writing_anything(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    assert main(["finetune", "--config", FINETUNE, f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_embed_seq_len_past_the_models_positions_is_refused(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("a short text\n")
    out = tmp_path / "e.npy"
    embed = ["embed", HF_ENCODER, "-i", str(texts), "-o", str(out)]
    assert main([*embed, "--seq-len", "33"]) == 2  # was cut to 32 without a word
    err = capsys.readouterr().err.strip()
    assert "--seq-len 33 is past the model's 32 positions (its max_len); give --seq-len 32 " \
           "or less" in err and "\n" not in err
    assert not out.exists()
    assert main(embed) == 0 and out.exists()  # the default: 256, or max_len if lower


def test_bench_refuses_unknown_cases_and_device_counts(tmp_path, capsys):
    out = tmp_path / "results"
    for flag in ("--pipeline", "--finetune"):
        assert main(["bench", flag, "--cases", "no-such-case", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "No " + flag[2:] + " case(s) no-such-case" in err and "cases: " in err
    assert main(["bench", "--pipeline", "--cases", "pack-s128", "--out", str(out)]) == 2
    assert "pack-s128-b256" in capsys.readouterr().err  # the known names are listed
    with pytest.raises(SystemExit) as e:
        main(["bench", "--fake-cpu-devices", "-1", "--cases", "x"])
    assert e.value.code == 2
    assert "--fake-cpu-devices: -1: the number of CPU devices to fake must be at least 1" in \
        capsys.readouterr().err
    assert not out.exists()
