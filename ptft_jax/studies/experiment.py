"""`ptft experiment pretrain-vs-end-to-end`: pretrain the components apart, or train the fused
model end to end? The experiment answers it on the user's own image-text data.

Arms, each under the same budget of training FLOPs and for several seeds:

    a            the fused model trained end to end from scratch
    b            each tower pretrained on its own (image classification on the pairs' images
                 and labels; masked LM on the training texts), then the fused model finetuned
    c            the towers aligned contrastively (CLIP / SigLIP on the pairs), then fused and
                 finetuned
    d_b, d_c     arms b and c with both towers frozen: only the fusion layers and head train

Every stage is an ordinary ptft run directory under the experiment directory (its config
written in full, rerunnable alone); d_b and d_c reuse b's and c's pretraining runs of the same
seed and count their FLOPs. FLOPs are counted as the benchmarks count them (models/flops.py: 3x the
forward matmuls and convolutions per example; a frozen tower costs its forward pass only), so
a stage's steps are its share of the budget over its FLOPs per step, rounded down, and the
finetuning stage takes what the arm's pretraining left. An interrupted experiment resumes at
the stage and step where it stopped: finished stages are skipped, the unfinished one resumes
from its checkpoint.

Outputs in the experiment directory: plan.json (stages, steps, FLOPs), results.jsonl (one row
per arm and seed), results.md (mean and standard deviation over seeds of validation accuracy
and macro F1, training FLOPs, wall time) and accuracy_vs_flops.png.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from ptft_jax.ckpt.checkpoint import committed_steps
from ptft_jax.config.load import from_dict, merge_dicts, with_hf_model
from ptft_jax.config.reading import read_json, read_jsonl, read_yaml
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate
from ptft_jax.core.files import atomic_write_json, atomic_write_text, claim_folder
from ptft_jax.data.pairs import open_pairs
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer, train_tokenizer
from ptft_jax.jobs.entry import finetune, pretrain
from ptft_jax.models.flops import image_train_flops, multimodal_train_flops, train_flops_per_token
from ptft_jax.studies.experiment_report import ARM_TITLES, write_report
from ptft_jax.tasks.lm import MlmSpec

ARMS = ("a", "b", "c", "d_b", "d_c")
STAGES_OF = {"a": (), "b": ("image_pretrain", "text_pretrain"), "c": ("align",),
             "d_b": ("image_pretrain", "text_pretrain"), "d_c": ("align",)}
DEFAULT_SHARES = {"image_pretrain": 0.3, "text_pretrain": 0.2, "align": 0.5}
# At most this share of the budget may separate two arms' totals (whole steps round down).
MAX_IMBALANCE = 0.05


@dataclasses.dataclass
class ExperimentConfig:
    dir: str
    seeds: list
    budget_flops: float
    arms: list
    shares: dict
    evals: int
    finetune: dict  # the fused classifier's config (a ptft finetune config)
    overrides: dict  # stage name -> config overrides


def load_experiment(path) -> ExperimentConfig:
    path = Path(path)
    doc = read_yaml(path, "the experiment config", dict, "see configs/experiment_emoji.yaml")
    known = {"experiment", "finetune", "image_pretrain", "text_pretrain", "align"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; the sections are "
                          f"{', '.join(sorted(known))}.")
    e = doc.get("experiment")
    if not isinstance(e, dict) or "budget_flops" not in e:
        missing = "experiment.budget_flops" if isinstance(e, dict) else "the 'experiment' section"
        raise ConfigError(f"{path}: {missing} is missing: add experiment: {{budget_flops: ...}} "
                          f"(training FLOPs per arm, e.g. 2.0e13; see "
                          f"configs/experiment_emoji.yaml).")
    e = dict(e)
    keys = {"dir", "seeds", "budget_flops", "arms", "shares", "evals"}
    if set(e) - keys:
        raise ConfigError(f"{path}: unknown experiment key(s) {sorted(set(e) - keys)}; valid: "
                          f"{', '.join(sorted(keys))}.")
    if not isinstance(doc.get("finetune"), dict):
        raise ConfigError(f"{path}: the 'finetune' section (the fused classifier and its data, "
                          f"as in a ptft finetune config) is missing.")
    arms = e.get("arms", ["a", "b", "c", "d"])
    arms = [x for a in arms for x in (("d_b", "d_c") if a == "d" else (a,))]
    cfg = ExperimentConfig(
        dir=str(e.get("dir", "runs/experiment")), seeds=list(e.get("seeds", [0, 1, 2])),
        budget_flops=float(e.get("budget_flops", 0)), arms=arms,
        shares={**DEFAULT_SHARES, **(e.get("shares") or {})}, evals=int(e.get("evals", 5)),
        finetune=doc["finetune"],
        overrides={k: doc.get(k) or {} for k in ("image_pretrain", "text_pretrain", "align")})
    check(cfg)
    return cfg


def check(cfg: ExperimentConfig) -> None:
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        raise ConfigError(f"experiment.arms {bad or cfg.arms}: choose among a, b, c, d (d runs "
                          f"b's and c's pretraining with frozen towers; d_b or d_c alone).")
    if not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds) or \
            len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"experiment.seeds {cfg.seeds} must be distinct integers, e.g. "
                          f"[0, 1, 2].")
    if not cfg.budget_flops > 0:
        raise ConfigError("experiment.budget_flops must be a positive number of training FLOPs "
                          "per arm (e.g. 2.0e13).")
    if cfg.evals < 1:
        raise ConfigError(f"experiment.evals ({cfg.evals}) must be at least 1.")
    unknown = set(cfg.shares) - set(DEFAULT_SHARES)
    if unknown:
        raise ConfigError(f"experiment.shares: unknown stage(s) {sorted(unknown)}; the stages "
                          f"are {', '.join(DEFAULT_SHARES)}.")
    s = cfg.shares
    for key, value in s.items():
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"experiment.shares.{key} ({value}) must be in (0, 1): the share "
                              f"of an arm's budget its pretraining stage spends.")
    if s["image_pretrain"] + s["text_pretrain"] >= 1:
        raise ConfigError(f"experiment.shares: image_pretrain + text_pretrain = "
                          f"{s['image_pretrain'] + s['text_pretrain']:.2f} leaves arm b no "
                          f"budget to finetune; keep their sum below 1.")
    towers = cfg.finetune.get("towers") or {}
    for name in ("image", "text"):
        if (towers.get(name) or {}).get("init_from"):
            raise ConfigError(f"finetune.towers.{name}.init_from is set: the experiment decides "
                              f"where each arm's towers start; remove it.")
    if (cfg.finetune.get("finetune") or {}).get("init_from"):
        raise ConfigError("finetune.finetune.init_from is set: the experiment decides where "
                          "each arm starts; remove it.")


# ---------------------------------------------------------------------------------------------
# Stage configs, derived from the fused classifier's config


def _tower_model(ft: dict, name: str) -> dict:
    return copy.deepcopy(((ft.get("towers") or {}).get(name) or {}).get("model") or {})


def stage_dicts(cfg: ExperimentConfig, tokenizer: Path, vocab_size: int) -> dict[str, dict]:
    """The config dict of each kind of stage (before run_dir, steps and seed)."""
    ft = copy.deepcopy(cfg.finetune)
    root = Path(cfg.dir)
    data = dict(ft.get("data") or {})
    text_model = {**_tower_model(ft, "text"), "vocab_size": vocab_size}
    image_model = {"kind": "vit", **_tower_model(ft, "image")}
    common = {k: copy.deepcopy(ft[k]) for k in ("optim", "mesh", "checkpoint", "distributed")
              if k in ft}
    train = {k: v for k, v in (ft.get("train") or {}).items()
             if k in ("global_batch", "log_every", "progress")}
    dtypes = {k: v for k, v in (ft.get("model") or {}).items() if k in ("dtype", "param_dtype")}
    base_data = {"cache_dir": str(root / "data_cache"), "tokenizer": str(tokenizer),
                 **{k: data[k] for k in ("corpus", "split", "eval_split", "eval_corpus",
                                         "image_column", "text_column", "label_column",
                                         "seq_len", "resize", "skip_bad_images", "num_workers")
                    if k in data}}
    towers = copy.deepcopy(ft.get("towers") or {})
    towers.setdefault("text", {})["model"] = text_model
    towers.setdefault("image", {})["model"] = image_model
    stages = {
        "image_pretrain": {
            **common, "model": {**image_model, **dtypes},
            "data": {k: v for k, v in base_data.items() if k not in ("tokenizer", "text_column",
                                                                     "seq_len")},
            "augment": copy.deepcopy(ft.get("augment") or {}),
            "train": {**train, "task": "image_classification"},
            "eval": {"batch_size": (ft.get("eval") or {}).get("batch_size", 64)}},
        "text_pretrain": {
            **common, "model": {**text_model, **dtypes},
            "data": {"corpus": str(root / "texts" / "train.txt"), "tokenizer": str(tokenizer),
                     "seq_len": data.get("seq_len", 128),
                     "cache_dir": str(root / "data_cache" / "text")},
            "train": {**train, "task": "mlm"}},
        "align": {
            **common, "model": {"kind": "two_tower", **dtypes}, "towers": towers,
            "data": base_data, "augment": copy.deepcopy(ft.get("augment") or {}),
            "train": {**train, "task": "contrastive"},
            "eval": {"batch_size": (ft.get("eval") or {}).get("batch_size", 64)}},
        "finetune": merge_dicts(ft, {"towers": towers, "data": base_data,
                                     "train": {"task": "multimodal_classification"}}),
    }
    for name, overrides in cfg.overrides.items():
        stages[name] = merge_dicts(stages[name], overrides)
    return stages


def build_config(stage: dict, run_dir: Path, steps: int, seed: int, evals: int,
                 extra: dict | None = None):
    """A full Config for one stage run."""
    every = max(1, -(-steps // evals))  # evals evaluations, the last one at the end
    d = merge_dicts(stage, {"run_dir": str(run_dir),
                            "train": {"steps": steps, "seed": seed},
                            "data": {"shuffle_seed": seed},
                            "checkpoint": {"every": every, "keep": 1}})
    if "eval" in d or stage.get("data", {}).get("eval_split"):
        d = merge_dicts(d, {"eval": {"every": every}})
    d = merge_dicts(d, extra or {})
    d["optim"] = {"warmup_steps": min(max(1, steps // 10), 100), **(d.get("optim") or {})}
    if d["optim"]["warmup_steps"] >= steps:
        d["optim"]["warmup_steps"] = max(0, steps // 10)
    return from_dict(with_hf_model(d))


# ---------------------------------------------------------------------------------------------
# Budget


def flops_per_step(cfg, stage: str, frozen: tuple[str, ...] = ()) -> float:
    B = cfg.train.global_batch
    if stage == "image_pretrain":
        return image_train_flops(cfg.model) * B
    if stage == "text_pretrain":
        T = cfg.data.seq_len
        slots = MlmSpec(0, (), 0, 1, mask_rate=cfg.objective.mask_rate).num_slots(T)
        flops = train_flops_per_token(cfg.model, T, predicted_positions=slots)
        return flops * T * B
    return multimodal_train_flops(cfg, frozen) * B


@dataclasses.dataclass
class Stage:
    name: str  # image_pretrain | text_pretrain | align | finetune
    run_dir: str
    steps: int
    flops: float  # training FLOPs of all its steps
    seed: int
    extra: dict  # config overrides this arm adds (init, freezing)


def plan(cfg: ExperimentConfig, stages: dict[str, dict], tokenizer: Path,
         devices: int) -> dict[str, dict[int, list[Stage]]]:
    """Per arm and seed, its stages in order with their steps and FLOPs. Refuses (before
    anything runs) a budget that gives a stage no step, or whose whole-step rounding would
    leave arms unequal by more than MAX_IMBALANCE of the budget."""
    root, budget = Path(cfg.dir), cfg.budget_flops
    per_step, probes = {}, {}
    for name in ("image_pretrain", "text_pretrain", "align", "finetune"):
        probe = build_config(stages[name], root / "probe", 1000, 0, cfg.evals)
        validate(probe, devices)
        probes[name] = probe
        per_step[name] = flops_per_step(probe, name)
    per_step["finetune_frozen"] = flops_per_step(probes["finetune"], "finetune",
                                                 frozen=("image", "text"))
    out: dict[str, dict[int, list[Stage]]] = {}
    for arm in cfg.arms:
        out[arm] = {}
        for seed in cfg.seeds:
            runs, used = [], 0.0
            for name in STAGES_OF[arm]:
                steps = int(cfg.shares[name] * budget // per_step[name])
                _need_steps(steps, name, arm, per_step[name])
                source_arm = arm[-1] if arm.startswith("d_") else arm
                run_dir = root / f"seed{seed}" / f"{source_arm}_{name}"
                runs.append(Stage(name, str(run_dir), steps, steps * per_step[name], seed, {}))
                used += steps * per_step[name]
            frozen = arm.startswith("d_")
            ft_step = per_step["finetune_frozen" if frozen else "finetune"]
            steps = int((budget - used) // ft_step)
            _need_steps(steps, "finetune", arm, ft_step)
            extra: dict = {}
            if arm in ("b", "d_b"):
                extra["towers"] = {"image": {"init_from": runs[0].run_dir},
                                   "text": {"init_from": runs[1].run_dir}}
            if arm in ("c", "d_c"):
                extra["finetune"] = {"init_from": runs[0].run_dir}
            if frozen:
                extra.setdefault("finetune", {})["freeze"] = ["^image/", "^text/"]
            runs.append(Stage("finetune", str(root / f"seed{seed}" / f"{arm}_finetune"), steps,
                              steps * ft_step, seed, extra))
            out[arm][seed] = runs
    totals = {arm: sum(s.flops for s in runs[cfg.seeds[0]]) for arm, runs in out.items()}
    spread = (max(totals.values()) - min(totals.values())) / budget
    if spread > MAX_IMBALANCE:
        worst = max(per_step.values())
        raise ConfigError(f"experiment.budget_flops {budget:.3g} cannot be split equally: whole "
                          f"steps leave the arms {spread:.1%} apart (over {MAX_IMBALANCE:.0%}); "
                          f"a step costs up to {worst:.3g} FLOPs. Raise budget_flops to at least "
                          f"{worst / MAX_IMBALANCE:.3g} or lower train.global_batch.")
    return out


def _need_steps(steps: int, stage: str, arm: str, per_step: float) -> None:
    if steps < 1:
        raise ConfigError(f"experiment.budget_flops leaves arm {arm}'s {stage} stage less than "
                          f"one step ({per_step:.3g} FLOPs each): raise budget_flops, or lower "
                          f"train.global_batch or the stage's share.")


# ---------------------------------------------------------------------------------------------
# Running


def prepare_texts_and_tokenizer(cfg: ExperimentConfig) -> tuple[Path, int]:
    """The training split's texts as a corpus for masked-LM pretraining, and the one tokenizer
    every stage shares (data.tokenizer, else a WordPiece trained on those texts), written once
    into the experiment directory. Returns (tokenizer path, the text tower's vocabulary)."""
    root = Path(cfg.dir)
    data = dict(cfg.finetune.get("data") or {})
    texts_path, tok_path = root / "texts" / "train.txt", root / "tokenizer.json"
    if not texts_path.exists() or not tok_path.exists():
        try:
            source = open_pairs(data.get("corpus", ""), data.get("split", "train"),
                                data.get("image_column", "image"),
                                data.get("text_column", "text"), data.get("label_column"))
            texts = [t.replace("\n", " ") for t in source.texts()]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        claim_folder(root, "experiment", "experiment.dir", legacy=["plan.json"])
        texts_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(texts_path, "\n".join(texts) + "\n")
        if data.get("tokenizer"):
            tok = load_tokenizer(data["tokenizer"])
        else:
            tok = train_tokenizer("encoder", iter(texts), int(data.get("tokenizer_vocab_size",
                                                                        4096)))
        atomic_write_text(tok_path, tok.to_str(pretty=True))
    size = TokenIds.of(load_tokenizer(tok_path), "encoder").vocab_size
    return tok_path, -(-size // 128) * 128


def _stage_result(stage: Stage, cfg) -> dict | None:
    """A finished stage's record (result.json), or None if it has not finished."""
    path = Path(stage.run_dir) / "result.json"
    if path.exists():
        return read_json(path, "a stage's result.json")
    steps = committed_steps(Path(stage.run_dir) / "checkpoints")
    if steps and steps[-1] >= stage.steps:  # trained, stopped before writing its record
        return _write_result(stage, cfg, wall_s=None)
    return None


def _write_result(stage: Stage, cfg, wall_s: float | None) -> dict:
    rows = [row for _, row in read_jsonl(Path(stage.run_dir) / "metrics.jsonl",
                                         "a run's metrics.jsonl")]
    evals = [r for r in rows if "eval/loss" in r]
    result = {"stage": stage.name, "run_dir": stage.run_dir, "steps": stage.steps,
              "flops": stage.flops, "seed": stage.seed, "wall_s": wall_s,
              "evals": [{k: v for k, v in r.items() if k == "step" or k in (
                  "eval/accuracy", "eval/macro_f1", "eval/loss", "eval/retrieval_mean",
                  "eval/zero_shot_accuracy")} for r in evals]}
    if evals:
        result["final"] = {k[5:]: v for k, v in evals[-1].items()
                           if k.startswith("eval/") and isinstance(v, (int, float))}
    atomic_write_json(Path(stage.run_dir) / "result.json", result, indent=None)
    return result


def run_stage(stage: Stage, stages: dict[str, dict], cfg: ExperimentConfig, echo) -> dict:
    config = build_config(stages[stage.name], Path(stage.run_dir), stage.steps, stage.seed,
                          cfg.evals, stage.extra)
    done = _stage_result(stage, config)
    if done is not None:
        return done
    echo(f"[{Path(stage.run_dir).parent.name}/{Path(stage.run_dir).name}] {stage.steps} steps, "
         f"{stage.flops:.3g} FLOPs")
    t0 = time.perf_counter()
    summary = (finetune if stage.name == "finetune" else pretrain)(config)
    if summary.get("stopped_by_signal"):
        raise KeyboardInterrupt
    if summary.get("diverged"):
        raise ConfigError(f"{stage.run_dir} diverged ({summary['stop_reason']}); lower the "
                          f"stage's optim.learning_rate and run the experiment again.")
    return _write_result(stage, config, time.perf_counter() - t0)


def run(path, echo=print) -> list[dict]:
    import jax
    cfg = load_experiment(path)
    root = Path(cfg.dir)
    tokenizer, vocab = prepare_texts_and_tokenizer(cfg)
    stages = stage_dicts(cfg, tokenizer, vocab)
    arms = plan(cfg, stages, tokenizer, jax.device_count())
    described = {arm: {str(seed): [dataclasses.asdict(s) for s in runs]
                       for seed, runs in by_seed.items()} for arm, by_seed in arms.items()}
    plan_path = root / "plan.json"
    if plan_path.exists() and read_json(plan_path, "the experiment's plan.json") != described:
        raise ConfigError(f"{plan_path} holds another plan (the config changed since the "
                          f"experiment started); use a new experiment.dir, or restore the "
                          f"config to resume.")
    atomic_write_json(plan_path, described)
    # Seeds repeat the same shapes: a persistent compilation cache saves most recompiles.
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    rows = []
    for seed in cfg.seeds:
        for arm in cfg.arms:
            results = [run_stage(s, stages, cfg, echo) for s in arms[arm][seed]]
            final = results[-1].get("final", {})
            walls = [r["wall_s"] for r in results]
            rows.append({"arm": arm, "seed": seed, "title": ARM_TITLES[arm],
                         "accuracy": final.get("accuracy"), "macro_f1": final.get("macro_f1"),
                         "flops": sum(r["flops"] for r in results),
                         "wall_s": sum(walls) if None not in walls else None,
                         "stages": [{k: r[k] for k in ("stage", "run_dir", "steps", "flops")}
                                    for r in results],
                         "curve": _curve(results)})
    write_report(cfg, rows)
    return rows


def _curve(results: list[dict]) -> list[list[float]]:
    """(cumulative training FLOPs, validation accuracy) at each finetuning evaluation."""
    before = sum(r["flops"] for r in results[:-1])
    ft = results[-1]
    per_step = ft["flops"] / max(ft["steps"], 1)
    return [[before + e["step"] * per_step, e["eval/accuracy"]] for e in ft["evals"]
            if "eval/accuracy" in e]
