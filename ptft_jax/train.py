"""The training loop, top to bottom: config -> data -> model -> state -> steps -> checkpoints.

Resume order: a checkpoint in the run directory, else a fresh initialisation. Everything that
can be wrong with the inputs is checked before the first compile.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding
from tokenizers import Tokenizer

from ptft_jax import perf
from ptft_jax.checkpoint import Checkpointer
from ptft_jax.config import (Config, ConfigError, objective_for, resolve_mesh_shape,
                             validate)
from ptft_jax.data.cache import TokenCache, prepare_cache
from ptft_jax.data.loader import BatchLoader, prefetch
from ptft_jax.data.packing import Packer
from ptft_jax.data.sources import open_documents
from ptft_jax.data.tokenizer import (TokenIds, iter_texts, load_tokenizer, run_tokenizer_path,
                                     train_tokenizer)
from ptft_jax.mesh import (LOGICAL_RULES, global_batch_array, initialize_distributed,
                           make_mesh, process_rows)
from ptft_jax.metrics import MetricsWriter
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.objectives import OBJECTIVES, MlmSpec
from ptft_jax.optim import make_optimizer
from ptft_jax.state import (TrainState, abstract_state, init_state, state_shardings,
                             with_shardings)
from ptft_jax.step import make_jit_step, make_pmap_step, pmap_sharding

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data: tokenizer (the run directory's wins, so a resumed run keeps its vocabulary) and packing


def prepare_tokenizer(cfg: Config, run_dir: Path, documents):
    """The tokenizer `run_tokenizer_path` names, else a new one trained on the documents (the
    caller saves it into the run directory once every check has passed)."""
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if path is not None:
        return load_tokenizer(path)
    # HF's WordPiece trainer breaks frequency ties in hash order, so two trainings on the same
    # text can differ in a few tokens. On multi-host, process 0 trains and the others take its
    # tokenizer; the run directory keeps it for every later resume.
    tok = None
    if jax.process_index() == 0:
        tok = train_tokenizer(cfg.model.kind, iter_texts(documents),
                              cfg.data.tokenizer_vocab_size,
                              extra_special_tokens=cfg.data.extra_special_tokens)
    if jax.process_count() > 1:
        tok = Tokenizer.from_str(_broadcast_text(tok.to_str() if tok is not None else ""))
    return tok


def open_token_cache(cfg: Config, run_dir: Path, documents) -> TokenCache:
    """The pre-tokenized cache of the documents, built on first use (resumably) by process 0;
    the other processes open it once it is ready (the cache folder must be shared)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    tokenizer_path = run_dir / "tokenizer.json"
    cache = None
    if jax.process_index() == 0:
        cache = prepare_cache(documents, tokenizer_path, cache_dir, cfg.data.num_workers,
                              progress=cfg.train.progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ptft token cache ready")
        if cache is None:
            cache = TokenCache.open(cache_dir, tokenizer_path, documents)
    return cache


def _broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process."""
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, len(data))] = data[:size]
    return bytes(multihost_utils.broadcast_one_to_all(padded)).decode()


def resolve_vocab(cfg: Config, token_ids: TokenIds) -> Config:
    """model.vocab_size must fit the tokenizer: equal to its size, or that size rounded up to a
    multiple of 128 (padding rows make the vocabulary matmuls faster). null picks the latter."""
    size = token_ids.vocab_size
    padded = -(-size // 128) * 128
    vocab = cfg.model.vocab_size
    if vocab is None:
        vocab = padded
    elif vocab not in (size, padded):
        raise ConfigError(f"model.vocab_size is {vocab} but the tokenizer has {size} tokens. "
                          f"Set model.vocab_size={padded} (or {size}), or null to follow the "
                          f"tokenizer; to keep {vocab}, use a tokenizer of that size.")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def check_data_position(meta: dict, loader: BatchLoader) -> None:
    """Exact resume needs the same rows in the same order: same seed, same number of rows per
    epoch, same global batch. Anything else would silently replay or skip data."""
    saved = meta.get("data", {})
    now = loader.position(int(meta["step"]))
    for key in ("seed", "rows_per_epoch", "samples_seen"):
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"The checkpoint was reading a different data stream ({key}: {saved[key]} "
                f"then, {now[key]} now): the corpus, data.seq_len, data.packing, "
                f"data.shuffle_seed or train.global_batch changed. Restore them to resume "
                f"exactly, or start a new run_dir.")


def objective_spec(cfg: Config, ids: TokenIds):
    if objective_for(cfg) != "mlm":
        return None
    first_regular = max(ids.special_ids) + 1  # our tokenizers put special tokens first
    return MlmSpec.from_config(cfg.objective, mask_id=ids.mask_id, special_ids=ids.special_ids,
                               random_low=first_regular, random_high=ids.vocab_size)


# ---------------------------------------------------------------------------------------------
# The engine: model, optimizer, shardings and the compiled step, from the config alone


@dataclasses.dataclass
class Engine:
    """What a run needs that follows from its config: the model and optimizer, the state's
    shardings, the compiled step, and how host batches become device arrays."""
    cfg: Config
    model: LanguageModel
    tx: object
    abstract: TrainState  # shapes only
    shardings: TrainState
    step_fn: object  # (state, batch, key) -> (state, metrics)
    rows: slice  # the rows of each global batch this process feeds
    batch_sharding: object = None  # jit only

    @property
    def pmap(self) -> bool:
        return self.cfg.mesh.parallelism == "pmap"

    def init(self, key) -> TrainState:
        state = init_state(self.model, self.tx, key, self.cfg.data.seq_len, self.shardings)
        return self.place(state)

    def restore_target(self) -> TrainState:
        return with_shardings(self.abstract, self.shardings)

    def place(self, state: TrainState) -> TrainState:
        """Puts a state built on the mesh (or one device, for pmap) where the step wants it."""
        if not self.pmap:
            return state
        n = jax.local_device_count()
        return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state),
                              pmap_sharding())

    def host_state(self, state: TrainState) -> TrainState:
        """The state as checkpoints hold it (one copy, not one per pmap device)."""
        return jax.tree.map(lambda x: x[0], state) if self.pmap else state

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.pmap:
            n = jax.local_device_count()
            return jax.device_put({k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()},
                                  pmap_sharding())
        return global_batch_array(batch, self.batch_sharding, self.cfg.train.global_batch)


def resolve_loss_chunk(cfg: Config, data_parallel: int) -> int:
    """objective.loss_chunk, or for null: on CPU, the longest chunk whose float32 logits fit
    in about 8 MB (last-level cache) per device; elsewhere 0 (no chunking)."""
    if cfg.objective.loss_chunk is not None:
        return cfg.objective.loss_chunk
    if jax.default_backend() != "cpu":
        return 0
    rows = max(1, cfg.train.global_batch // cfg.train.grad_accum // data_parallel)
    fits = max(1, (8 << 20) // (rows * cfg.model.vocab_size * 4))
    length = cfg.data.seq_len
    chunk = max(c for c in range(1, length + 1) if length % c == 0 and c <= fits)
    return 0 if chunk == length else chunk


def build(cfg: Config, spec, devices=None) -> Engine:
    """Builds the engine for `cfg` on `devices` (default: all). `spec` is the objective's
    tokenizer-dependent part (an MlmSpec for masked LM, None for causal LM)."""
    t = cfg.train
    model = LanguageModel(cfg.model, deterministic=cfg.model.dropout == 0)
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    data_parallel = jax.device_count() if cfg.mesh.parallelism == "pmap" else None
    if data_parallel is None:
        data, fsdp, _ = resolve_mesh_shape(cfg.mesh, len(devices or jax.devices()))
        data_parallel = data * fsdp
    static = dict(model=model, tx=tx, schedule=schedule, objective=OBJECTIVES[objective_for(cfg)],
                  spec=spec, grad_accum=t.grad_accum,
                  loss_chunk=resolve_loss_chunk(cfg, data_parallel))
    abstract, logical_specs = abstract_state(model, tx, cfg.data.seq_len)
    if cfg.mesh.parallelism == "pmap":
        one = SingleDeviceSharding(jax.local_devices()[0])
        per_process = t.global_batch // jax.process_count()
        first = jax.process_index() * per_process
        return Engine(cfg, model, tx, abstract, jax.tree.map(lambda _: one, abstract),
                      make_pmap_step(**static), slice(first, first + per_process))
    mesh = make_mesh(cfg.mesh, devices)
    shardings = state_shardings(abstract, logical_specs, tx, mesh, LOGICAL_RULES)
    step_fn = make_jit_step(mesh, shardings, LOGICAL_RULES, **static)
    return Engine(cfg, model, tx, abstract, shardings, step_fn,
                  process_rows(step_fn.batch_sharding, t.global_batch), step_fn.batch_sharding)


# ---------------------------------------------------------------------------------------------
# The loop


def pretrain(cfg: Config) -> dict:
    initialize_distributed(cfg.distributed)
    validate(cfg, jax.device_count())
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    t, B, T = cfg.train, cfg.train.global_batch, cfg.data.seq_len

    # Documents and tokenizer, then the model's vocabulary from the tokenizer.
    try:
        documents = open_documents(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokenizer = prepare_tokenizer(cfg, run_dir, documents)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)

    engine = build(cfg, objective_spec(cfg, token_ids))
    step_fn, objective = engine.step_fn, objective_for(cfg)

    # The run directory's latest checkpoint must fit the model before anything is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save)
    start_step = ckpt.latest_step() or 0
    if start_step >= t.steps:
        ckpt.close()
        raise ConfigError(f"{run_dir} already holds a checkpoint at step {start_step}, at or "
                          f"past train.steps={t.steps}: nothing to do. Raise train.steps to "
                          f"continue training, or use a new run_dir.")
    if start_step:
        ckpt.check_shapes(start_step, engine.abstract.params)

    # The tokenizer goes into the run directory, the documents into the token cache (built on
    # first use, resumable), and the cache into fixed-length rows.
    if is_main and not (run_dir / "tokenizer.json").exists():
        tokenizer.save(str(run_dir / "tokenizer.json"))
    cache = open_token_cache(cfg, run_dir, documents)
    packer = Packer(cache.tokens, cache.offsets, T, token_ids.bos_id, token_ids.eos_id,
                    cfg.data.packing)
    loader = BatchLoader(packer, B, cfg.data.shuffle_seed, engine.rows)

    # Resume from the run directory, else initialise from scratch.
    init_key, train_key = jax.random.split(jax.random.key(t.seed))
    if start_step:
        state, meta = ckpt.restore(start_step, engine.restore_target())
        check_data_position(meta, loader)
        state = engine.place(state)
    else:
        state = engine.init(init_key)
    if is_main:  # every check has passed: the config this run trains with
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # The MFU reference, timed before the input thread starts so nothing competes with it.
    peak, peak_source = perf.system_peak_flops()
    batches = prefetch((engine.to_device(loader.batch(s)) for s in range(start_step, t.steps)),
                       cfg.data.prefetch)

    writer = MetricsWriter(run_dir, t.steps, start_step, is_main, t.progress)
    writer.info(f"{objective} | {cfg.model.kind} {cfg.model.preset or ''} "
                f"{perf.matmul_params(cfg.model) / 1e6:.2f}M matmul params | "
                f"{len(packer)} rows of {T} tokens ({cfg.data.packing}; {packer.dropped_tokens} tail "
                f"tokens dropped) | "
                f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
                f"{cfg.mesh.parallelism} | run dir {run_dir}"
                + (f" | resumed at step {start_step}" if start_step else ""))
    flops_per_token = perf.train_flops_per_token(cfg.model, T)

    # Compile once, apart from the steps, so step times are steady-state.
    first = next(batches, None)
    t0 = time.perf_counter()
    if first is not None:
        step_fn = step_fn.lower(state, first, train_key).compile()
    compile_seconds = time.perf_counter() - t0
    writer.info(f"compile {compile_seconds:.1f}s | MFU against {peak / 1e12:.2f} TFLOP/s "
                f"({peak_source})")

    def save(step):
        meta = {"config": cfg.to_dict(), "data": loader.position(step),
                "objective": objective, "tokenizer_vocab_size": token_ids.vocab_size}
        ckpt.save(step, engine.host_state(state), meta)

    pending: list = []
    last: dict = {}
    step = start_step
    interval_start = time.perf_counter()
    batch = first
    with StopOnSignal() as stop:
        while step < t.steps:
            state, metrics = step_fn(state, batch, train_key)
            step += 1
            pending.append(metrics)
            writer.advance()
            at_log = step % t.log_every == 0 or step == t.steps
            if at_log:
                values = [engine.host_state(v) for v in jax.device_get(pending)]  # waits
                elapsed = time.perf_counter() - interval_start
                last = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                tokens_per_s = len(values) * B * T / elapsed
                last.update(step_time_s=elapsed / len(values), tokens_per_s=tokens_per_s,
                            tokens_per_s_per_device=tokens_per_s / jax.device_count(),
                            mfu=perf.mfu(tokens_per_s, flops_per_token, peak))
                writer.write(step, last)
                pending = []
                interval_start = time.perf_counter()
            stopping = stop.agreed(check_all_processes=at_log)
            if ckpt.should_save(step) or step == t.steps or stopping:
                save(step)
            if stopping:
                writer.info(f"Stopped by {stop.signal_name}: saved step {step}. Run the same "
                            f"command to resume.")
                break
            if step < t.steps:
                batch = next(batches)
    ckpt.close()
    writer.close()
    return {"run_dir": str(run_dir), "steps": step, "start_step": start_step,
            "stopped_by_signal": stop.signal_name,
            "compile_seconds": compile_seconds, "peak_flops": peak,
            "flops_per_token": flops_per_token, **last}



class StopOnSignal:
    """Turns SIGINT / SIGTERM (Ctrl-C, preemption) into a request to stop between steps, so
    the loop saves a checkpoint instead of dying inside a step whose inputs were donated.
    A second signal interrupts at once. On multi-host, processes agree at log steps."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # the second time: stop now
            signal.default_int_handler(signum, frame)
        self.signal_name = signal.Signals(signum).name

    def agreed(self, check_all_processes: bool) -> bool:
        """Whether to stop now. Single-process: at once. Multi-host: only when every process
        asks together (at log steps), so that none waits alone in a collective."""
        if jax.process_count() == 1:
            return self.signal_name is not None
        if not check_all_processes:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        if flags.any() and self.signal_name is None:
            self.signal_name = "another process"
        return bool(flags.any())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
