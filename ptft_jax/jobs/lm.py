"""Pretraining a language model: tokenized documents packed into rows (with segment ids and
positions) for masked or causal LM."""
from __future__ import annotations

from pathlib import Path

from ptft_jax.config.schema import Config, ConfigError, task_for
from ptft_jax.data.cache import TokenCache
from ptft_jax.data.cache_build import prepare_cache_once
from ptft_jax.data.opening import open_documents
from ptft_jax.data.packing import Packer
from ptft_jax.data.tokenizer import TokenIds
from ptft_jax.jobs.common import prepare_tokenizer, pretrained_init, resolve_vocab, save_tokenizer
from ptft_jax.tasks.lm import CausalLM, MaskedLM, MlmSpec
from ptft_jax.tasks.vocab_loss import LOSS_CHUNK_AUTO_TOKENS
from ptft_jax.train.engine import data_parallel_size
from ptft_jax.train.job import Job


def open_token_cache(cfg: Config, run_dir: Path, documents) -> TokenCache:
    """The pre-tokenized cache of the documents, built on first use (resumably) by process 0;
    the other processes open it once it is ready (the cache folder must be shared)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    return prepare_cache_once(documents, run_dir / "tokenizer.json", cache_dir,
                              cfg.data.num_workers, progress=cfg.train.progress)


def mlm_spec(cfg: Config, ids: TokenIds) -> MlmSpec:
    first_regular = max(ids.special_ids) + 1  # our tokenizers put special tokens first
    return MlmSpec.from_config(cfg.objective, mask_id=ids.mask_id, special_ids=ids.special_ids,
                               random_low=first_regular, random_high=ids.vocab_size)


def resolve_loss_chunk(cfg: Config) -> int:
    """objective.loss_chunk (tokens per device per chunk of the vocabulary loss), or for null
    the measured default: LOSS_CHUNK_AUTO_TOKENS (see benchmarks/loss_chunk.py)."""
    if cfg.objective.loss_chunk is not None:
        return cfg.objective.loss_chunk
    return LOSS_CHUNK_AUTO_TOKENS


def lm_task(cfg: Config, spec: MlmSpec | None, devices=None):
    """The masked or causal LM task of `cfg` (spec: the tokenizer's masking ids, for MLM)."""
    chunk = resolve_loss_chunk(cfg)
    # Under pmap the step traces one device's rows; under jit, the global batch.
    split = 1 if cfg.mesh.parallelism == "pmap" else data_parallel_size(cfg, devices)
    if task_for(cfg) == "mlm":
        return MaskedLM(cfg.model, spec, chunk, split)
    return CausalLM(cfg.model, chunk, split)


def pretrain_job(cfg: Config) -> Job:
    run_dir = Path(cfg.run_dir)
    try:
        documents = open_documents(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokenizer = prepare_tokenizer(cfg, run_dir, documents)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)
    task = lm_task(cfg, mlm_spec(cfg, token_ids) if task_for(cfg) == "mlm" else None)

    class LazyRows:
        """The packed rows, built on first use: the token cache is made only after every
        check on the run directory has passed."""
        packer = None

        def build(self):
            if self.packer is None:
                cache = open_token_cache(cfg, run_dir, documents)
                self.packer = Packer(cache.tokens, cache.offsets, cfg.data.seq_len,
                                     token_ids.bos_id, token_ids.eos_id, cfg.data.packing)
            return self.packer

        def __len__(self):
            return len(self.build())

        def rows(self, index):
            return self.packer.rows(index)

    rows = LazyRows()

    def save_files():
        save_tokenizer(tokenizer, run_dir)
        rows.build()

    def describe():
        p = rows.build()
        return (f"{len(p)} rows of {cfg.data.seq_len} tokens ({cfg.data.packing}; "
                f"{p.dropped_tokens} tail tokens dropped)")
    return Job(cfg, task, rows, describe, {"tokenizer_vocab_size": token_ids.vocab_size},
               save_files, init_from=pretrained_init(cfg, token_ids),
               tokens_per_row=cfg.data.seq_len)
