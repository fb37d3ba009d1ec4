"""Fakes 8 CPU devices before JAX initialises, and offers small configs and corpora."""
import os

from tests.xla_flags import fake_devices  # noqa: E402  (imports nothing: JAX not started)

# Subprocesses (CLI runs, two-process runs) inherit these flags or set their own from
# tests/xla_flags.py.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fake_devices(8)).strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same small programs (the same tiny model's init and step on the same
# mesh, CLI runs resumed in subprocesses): JAX's persistent compilation cache, one per test
# session, shared by the xdist workers and the subprocesses through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"),
    f"ptft-test-jax-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))

import gzip  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from ptft_jax.config.load import load_config  # noqa: E402
from ptft_jax.data.corpus import BUNDLED  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices (set before JAX initialises)"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The first 60 chapters of the bundled corpus: enough for a tokenizer, fast to pack."""
    with gzip.open(BUNDLED["kjv"], "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, small_corpus):
    """One short pretraining run that finetuning tests start from (they only read it)."""
    from ptft_jax.jobs.entry import pretrain
    run = tmp_path_factory.mktemp("pretrained") / "pre"
    pretrain(load_config("configs/pretrain_tiny_mlm.yaml", [
        f"run_dir={run}", f"data.corpus={small_corpus}", "data.tokenizer_vocab_size=512",
        "train.steps=2", "train.global_batch=8", "checkpoint.every=0", "data.seq_len=32",
        "model.max_len=32", "train.progress=false"]))
    return run


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """A small LoRA classifier (tests/helpers.py) that the inference tests only read: serve,
    quantize."""
    from tests.helpers import lora_classifier
    return lora_classifier(tmp_path_factory.mktemp("lora"), seq_len=40)
