"""Configs: every shipped file loads and validates; bad input gets a clear, early error."""
from pathlib import Path

import pytest
import yaml

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.resolve import resolve_mesh_shape
from ptft_jax.config.validate import validate

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    first = path.read_text().splitlines()[0]
    if path.name.startswith("experiment"):
        from ptft_jax.studies import experiment
        cfg = experiment.load_experiment(path)
        stages = experiment.stage_dicts(cfg, Path("tokenizer.json"), 2048)
        arms = experiment.plan(cfg, stages, Path("tokenizer.json"), 8)  # validates each stage
        assert set(arms) == set(cfg.arms)
        assert first.startswith("# ptft experiment pretrain-vs-end-to-end --config configs/" +
                                path.name)
        return
    if path.name.startswith("sweep_"):  # a search space: its keys and every value it sets
        from ptft_jax.studies.sweep.space import extremes, load_space
        from ptft_jax.studies.sweep.study import config_with
        words = first.split()
        assert words[:3] == ["#", "ptft", "sweep"] and words[-1] == "configs/" + path.name
        raw = yaml.safe_load(Path(words[words.index("--config") + 1]).read_text())
        params, _ = load_space(path)
        for values in extremes(params):
            validate(config_with(raw, values), num_devices=8)
        return
    cfg = load_config(path)
    validate(cfg, num_devices=8)
    command = "finetune" if path.name.startswith("finetune") else "pretrain"
    assert first.startswith(f"# ptft {command} --config configs/" + path.name), \
        "a config's first line is the exact command that runs it"


def test_overrides_and_presets():
    cfg = load_config("configs/pretrain_tiny_mlm.yaml",
                      ["train.steps=7", "model.preset=bert-base", "optim.learning_rate=3e-4",
                       "model.dtype=bfloat16"])
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 3e-4
    # The preset fills the shape; keys set in the file (max_len) still win over it.
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (12, 768, 12)
    assert cfg.model.max_len == 128
    assert load_config(None, ["model.preset=gpt2-medium"]).model.num_layers == 24


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "Did you mean 'train.steps'"),
    (["modle.preset=bert-tiny"], "Did you mean 'model'"),
    (["model.preset=bert-tny"], "Did you mean 'bert-tiny'"),
    (["train.steps=ten"], "'train.steps' must be an integer"),
    (["train.steps"], "not of the form key.sub=value"),
    (["model.remat=everything"], "'model.remat' is 'everything'; it must be one of: none, full"),
    (["towers.text.pooling=max"], "'towers.text.pooling' is 'max'; it must be one of: mean, cls"),
])
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/pretrain_tiny_mlm.yaml", overrides)


@pytest.mark.parametrize("overrides, devices, message", [
    (["train.global_batch=30"], 8, r"divisible by the data-parallel size .* Try "
                                   r"train.global_batch=32"),
    (["train.global_batch=32", "train.grad_accum=8"], 8, "must be divisible by"),
    (["train.global_batch=32", "train.grad_accum=3"], 8, "not divisible by train.grad_accum"),
    (["mesh.data=3"], 8, "3\\*1\\*1 = 3, but 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, "At most one"),
    (["mesh.parallelism=pmap", "train.global_batch=12"], 8, "mesh.parallelism=pmap"),
    (["data.seq_len=256"], 1, "exceeds model.max_len"),
    (["model.num_heads=3"], 1, "divisible by model.num_heads"),
    (["train.task=clm"], 1, "needs model.kind 'decoder'"),
    (["optim.learning_rate=0"], 1, "must be positive"),
    (["optim.weight_decay_rules=[['(', false]]"], 1, "does not compile"),
])
def test_validate_rejects_before_compiling(overrides, devices, message):
    cfg = load_config("configs/pretrain_tiny_mlm.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, devices)


def test_validate_checks_the_allowed_values_of_a_config_built_in_code():
    """The Literal types in schema.py are the one list of allowed values: load.py refuses
    others as it reads, validate() for a Config that never went through YAML."""
    cfg = load_config("configs/pretrain_tiny_mlm.yaml", [])
    cfg.towers.image.model.resnet_block = "wide"
    with pytest.raises(ConfigError, match="'towers.image.model.resnet_block' is 'wide'; it "
                                          "must be one of: basic, bottleneck"):
        validate(cfg, 1)


def test_mesh_minus_one_takes_the_rest():
    cfg = load_config(None, ["mesh.data=-1", "mesh.tensor=2"])
    assert resolve_mesh_shape(cfg.mesh, 8) == (4, 1, 2)


def test_a_run_named_by_init_from_gives_the_model_its_shape(tmp_path):
    """finetune.init_from: RUN (or RUN/checkpoints/N) with no shape in the model section
    takes the run's, as hf: takes config.json's; a config that sets one keeps it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "7").mkdir(parents=True)
    shape = {"preset": "bert-mini", "kind": "encoder", "vocab_size": 777, "hidden_size": 64,
             "num_layers": 3, "num_heads": 2, "mlp_dim": 96, "max_len": 48, "dropout": 0.3}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": shape}))
    for spec in (run, run / "checkpoints" / "7"):
        cfg = load_config(None, [f"finetune.init_from={spec}", "model.dropout=0.05"])
        m = cfg.model
        assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim,
                m.max_len) == (777, 64, 3, 2, 96, 48)
        assert m.dropout == 0.05  # not a shape key: the finetune config's own
    kept = load_config(None, [f"finetune.init_from={run}", "model.preset=bert-tiny"]).model
    assert (kept.hidden_size, kept.num_layers) == (128, 2)
    kept = load_config(None, [f"finetune.init_from={run}", "model.hidden_size=32"]).model
    assert kept.hidden_size == 32 and kept.num_layers != 3
    plain = load_config(None, [f"finetune.init_from={tmp_path / 'nothing'}"]).model
    assert plain.hidden_size != 64  # not a run: left to init_from's own check
