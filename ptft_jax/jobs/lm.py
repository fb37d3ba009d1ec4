"""Pretraining a language model: tokenized documents packed into rows (with segment ids and
positions) for masked or causal LM."""
from __future__ import annotations

from pathlib import Path

from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.data.cache import TokenCache
from ptft_jax.data.cache_build import prepare_cache_once
from ptft_jax.data.opening import open_documents
from ptft_jax.data.packing import Packer
from ptft_jax.data.tokenizer import TokenIds, tokenizer_source
from ptft_jax.jobs.common import (data_cache_root, prepare_tokenizer, pretrained_init,
                                  resolve_vocab, save_run_files, text_throughput)
from ptft_jax.jobs.distill import (check_same_tokenizer, distill_task, open_teacher,
                                   teacher_init, with_teacher_tokenizer)
from ptft_jax.tasks.factory import make_task, mlm_spec
from ptft_jax.tasks.lm import MaskedLM
from ptft_jax.train.job import Job, Throughput


def open_token_cache(cfg: Config, run_dir: Path, documents) -> TokenCache:
    """The pre-tokenized cache of the documents, built on first use (resumably) by process 0;
    the other processes open it once it is ready (the cache folder must be shared)."""
    cache_dir = data_cache_root(cfg, run_dir)
    return prepare_cache_once(documents, run_dir / "tokenizer.json", cache_dir,
                              cfg.data.num_workers, progress=cfg.train.progress)


def lm_throughput(cfg: Config, task) -> Throughput:
    """Tokens; masked LM computes its head at its masked slots only (models/flops.py)."""
    slots = task.spec.num_slots(cfg.data.seq_len) if isinstance(task, MaskedLM) else None
    return text_throughput(cfg, vocab_projection=True, predicted_positions=slots)


def pretrain_job(cfg: Config) -> Job:
    run_dir = Path(cfg.run_dir)
    teacher = open_teacher(cfg) if cfg.distill.teacher else None
    if teacher is not None:
        cfg = with_teacher_tokenizer(cfg, teacher)
    try:
        documents = open_documents(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokenizer = prepare_tokenizer(cfg, run_dir, documents)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)
    task = make_task(cfg, mlm=mlm_spec(cfg, token_ids) if task_for(cfg) == "mlm" else None)
    init_from = pretrained_init(cfg, token_ids)
    if teacher is not None:
        check_same_tokenizer(teacher, tokenizer, cfg.data.tokenizer)
        task = distill_task(cfg, task, teacher, token_ids.vocab_size)
        init_from = teacher_init(teacher, token_ids.vocab_size, then=init_from)

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
        save_run_files(run_dir, tokenizer,
                       tokenizer_made_by=tokenizer_source(cfg.data, cfg.model.kind))
        rows.build()

    def describe():
        p = rows.build()
        return (f"{len(p)} rows of {cfg.data.seq_len} tokens ({cfg.data.packing}; "
                f"{p.dropped_tokens} tail tokens dropped)"
                + (f" | distilling from {teacher.source}" if teacher is not None else ""))
    return Job(cfg, task, rows, describe, {"tokenizer_vocab_size": token_ids.vocab_size},
               save_files, lm_throughput(cfg, task.student if teacher else task),
               init_from=init_from)
