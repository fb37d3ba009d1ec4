"""`ptft`: the command line.

    ptft pretrain --config configs/pretrain_tiny_mlm.yaml [key.sub=value ...]
    ptft finetune --config configs/finetune_fortunes_full.yaml [key.sub=value ...]
    ptft eval RUN_DIR [--split NAME] [--corpus PATH]
    ptft predict RUN_DIR [--input FILE] [--output FILE]
    ptft export RUN_DIR OUT_DIR [--format ptft|hf|onnx]   (LoRA adapters merged)
    ptft embed SOURCE [--input FILE] [--output FILE.npy|.jsonl] [--pooling mean|cls]
    ptft serve SOURCE [--port 8000] [--host 127.0.0.1]   (HTTP: /v1/predict, /v1/embed, /docs)
    ptft tokenizer train --config FILE [key.sub=value ...] [--out PATH] [--force]
    ptft data prepare --config FILE [key.sub=value ...] [--overwrite]
    ptft checkpoints verify RUN_DIR   (every step's checksums; exit 1 if one is damaged)
    ptft bench --set cpu [--cases NAME ...] [--steps N] [--profile]
    ptft experiment pretrain-vs-end-to-end --config FILE
    ptft sweep --config FILE --space SPACE.yaml [key.sub=value ...] [--trials N] [--sampler ...]
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from ptft_jax.config.schema import ConfigError

# What each command runs: "module:function", imported only once its arguments have parsed, so
# that `ptft --help` and a mistyped argument answer at once, without loading JAX (seconds of
# start-up). Each function takes the parsed arguments and returns the exit code.
COMMANDS = {
    "pretrain": "ptft_jax.jobs.commands:train",
    "finetune": "ptft_jax.jobs.commands:train",
    "eval": "ptft_jax.infer.commands:evaluate",
    "predict": "ptft_jax.infer.commands:predict",
    "embed": "ptft_jax.infer.commands:embed",
    "serve": "ptft_jax.infer.server:command",
    "export": "ptft_jax.infer.commands:export",
    "tokenizer train": "ptft_jax.data.commands:tokenizer_train",
    "data prepare": "ptft_jax.data.commands:data_prepare",
    "checkpoints verify": "ptft_jax.ckpt.commands:verify",
    "bench": "ptft_jax.bench.commands:bench",
    "experiment": "ptft_jax.studies.commands:experiment",
    "sweep": "ptft_jax.studies.commands:sweep",
}


# Commands that need an optional extra (pyproject.toml): what to install when it is missing.
EXTRAS = {"serve": ("serve", ("fastapi", "uvicorn", "starlette", "pydantic"))}


def run_command(args) -> int:
    name = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    module, function = COMMANDS[name].split(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra, packages = EXTRAS.get(name, (None, ()))
        if extra is None or (e.name or "").split(".")[0] not in packages:
            raise
        raise ConfigError(f"ptft {name} needs {e.name}, which is not installed: pip install "
                          f"'ptft_jax[{extra}]'.") from None
    return getattr(loaded, function)(args)


class Once(argparse.Action):
    """An option given at most once: a second --config would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} is given twice; give one file (put overrides of it "
                         f"after it as key.sub=value).")
        setattr(namespace, self.dest, values)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file and `key.sub=value` overrides every config-driven command takes."""
    parser.add_argument("--config", "-c", action=Once, help="a YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*",
                        help="key.sub=value overrides, e.g. train.steps=100")


def at_least(low: int, what: str):
    """An argparse type: an integer >= low, else argparse's one-line error saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: the number of {what} must be at least "
                                             f"{low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("pretrain", help="pretrain a language model (MLM or causal LM)")
    _config_arguments(p)
    f = sub.add_parser("finetune", help="finetune a (pretrained) component on labelled data: "
                                        "classification, multi-label, regression")
    _config_arguments(f)
    e = sub.add_parser("eval", help="evaluate a finetuned run directory on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", help="the split to evaluate (default: data.eval_split)")
    e.add_argument("--corpus", help="another corpus (e.g. local files) holding the split")
    e.add_argument("--batch-size", type=at_least(1, "examples per batch"),
                   help="examples per batch (default: eval.batch_size)")
    pr = sub.add_parser("predict", help="predict labels for texts with a finetuned run "
                                        "directory; JSONL out")
    pr.add_argument("run_dir")
    pr.add_argument("--input", "-i", help="a text file (one text per line) or .jsonl / .csv "
                                          "with 'text' (and 'text_pair'); default: stdin. For an "
                                          "image run: an image, a folder of images, or a "
                                          "file listing image paths. For an image-text run: "
                                          "a .jsonl / .csv with 'image' and 'text'")
    pr.add_argument("--output", "-o", help="where to write JSONL (default: stdout)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace the --output file if it exists (default: refuse)")
    pr.add_argument("--batch-size", type=at_least(1, "examples per batch"),
                    help="examples per batch (default: eval.batch_size)")
    em = sub.add_parser("embed", help="L2-normalised sentence embeddings of texts, from a "
                                      "ptft run or a Hugging Face model directory")
    em.add_argument("source", help="a ptft run directory, a Hugging Face model directory, or "
                                   "hf:OWNER/NAME")
    em.add_argument("--input", "-i", help="a text file (one text per line) or .jsonl with "
                                          "'text'; default: stdin")
    em.add_argument("--output", "-o", help="FILE.npy (an array, one row per text) or a JSONL "
                                           "file; default: JSONL on stdout")
    em.add_argument("--overwrite", action="store_true",
                    help="replace the --output file if it exists (default: refuse)")
    em.add_argument("--pooling", choices=("mean", "cls", "last"),
                    help="default: the model's own (sentence-transformers' 1_Pooling), else "
                         "mean for encoders and last for decoders")
    em.add_argument("--seq-len", type=int, help="tokens per text, at most the model's max_len "
                                                "(default: 256, or max_len if lower)")
    em.add_argument("--batch-size", type=at_least(1, "examples per batch"), default=64,
                    help="texts per batch (default 64)")
    sv = sub.add_parser("serve", help="an HTTP JSON server for a finetuned run (POST "
                                      "/v1/predict) or a text encoder (POST /v1/embed), "
                                      "requests batched together; docs at /docs")
    sv.add_argument("source", help="a finetuned run directory (predictions), or a pretraining "
                                   "run or Hugging Face model (hf:DIR) for embeddings")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                        "127.0.0.1: this machine only)")
    sv.add_argument("--port", type=at_least(0, "port"), default=8000, help="default 8000")
    sv.add_argument("--max-batch-tokens", type=at_least(16, "tokens"), default=4096,
                    help="tokens one model call gathers from concurrent requests (default "
                         "4096: on a CPU larger batches add latency, not throughput); the "
                         "batch shapes compiled at start-up follow from it")
    sv.add_argument("--max-batch-images", type=at_least(1, "images"), default=32,
                    help="images one model call gathers (image runs; default 32)")
    sv.add_argument("--max-wait-ms", type=at_least(0, "milliseconds"), default=0,
                    help="how long a batch waits for more requests after its first (default "
                         "0: it takes what queued while the model ran the last batch)")
    sv.add_argument("--no-batching", action="store_true",
                    help="run each request on its own (for comparison)")
    sv.add_argument("--max-texts", type=at_least(1, "texts"), default=256,
                    help="texts (or images) in one request, past which it gets 413 (default 256)")
    sv.add_argument("--max-body-bytes", type=at_least(1, "bytes"), default=8 << 20,
                    help="request body size, past which it gets 413 (default 8 MiB)")
    sv.add_argument("--max-concurrent", type=at_least(1, "requests"), default=64,
                    help="requests in flight, past which new ones get 429 (default 64)")
    sv.add_argument("--token", default=os.environ.get("PTFT_SERVE_TOKEN"),
                    help="require 'Authorization: Bearer TOKEN' on /v1/ routes but /v1/health "
                         "(default: $PTFT_SERVE_TOKEN, which keeps it out of the process list)")
    sv.add_argument("--seq-len", type=at_least(3, "tokens"),
                    help="embeddings: tokens per text (default 256, or max_len if lower)")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    ex = sub.add_parser("export", help="a run as a params-only run directory (--format ptft), "
                                       "a Hugging Face model directory (--format hf) or an "
                                       "ONNX model (--format onnx), LoRA adapters merged into "
                                       "the weights")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--format", choices=("ptft", "hf", "onnx"), default="ptft",
                    help="ptft: a finetuned run for ptft eval / predict / init_from; hf: "
                         "config.json + model.safetensors + tokenizer files for transformers; "
                         "onnx: model.onnx (+ tokenizer.json) for onnxruntime: a finetuned "
                         "text or image classifier, or a text encoder (a pretraining run or "
                         "hf:...) as embeddings; checked against ptft's outputs")
    ex.add_argument("--quantize", choices=("int8", "int8-weights"),
                    help="--format ptft: a run of Qwix's int8 model that eval / predict / "
                         "serve read (int8: weights and activations; int8-weights: weights "
                         "only); --format onnx: int8 (onnxruntime's dynamic quantization), "
                         "checked against ptft's float outputs")
    ex.add_argument("--prune-heads", type=int, metavar="K",
                    help="--format ptft, text classifiers: keep each layer's K most important "
                         "attention heads (Michel et al.'s gradient score on the run's "
                         "training examples) and cut the others out of the weights")
    t = sub.add_parser("tokenizer", help="tokenizer tools")
    t_sub = t.add_subparsers(dest="action", metavar="ACTION", required=True)
    tt = t_sub.add_parser("train", help="train a tokenizer on data.corpus: WordPiece for "
                                        "encoders, byte-level BPE for decoders")
    _config_arguments(tt)
    tt.add_argument("--out", help="where to save tokenizer.json (default: <run_dir>/"
                                  "tokenizer.json, where pretraining looks)")
    tt.add_argument("--force", "--overwrite", dest="force", action="store_true",
                    help="replace an existing file")
    d = sub.add_parser("data", help="data tools")
    d_sub = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    dp = d_sub.add_parser("prepare", help="tokenize data.corpus once into the cache at "
                                          "data.cache_dir (resumes when interrupted)")
    _config_arguments(dp)
    dp.add_argument("--overwrite", action="store_true",
                    help="replace a cache built from another tokenizer or source (it stays "
                         "usable until the new one is complete)")
    dp.add_argument("--shard-docs", type=at_least(1, "documents per shard"), default=10_000,
                    help="documents per resumable shard (default 10000)")
    c = sub.add_parser("checkpoints", help="checkpoint tools")
    c_sub = c.add_subparsers(dest="action", metavar="ACTION", required=True)
    cv = c_sub.add_parser("verify", help="read every checkpoint step of a run directory and "
                                         "check each array's checksum; prints a table")
    cv.add_argument("run_dir")
    b = sub.add_parser("bench", help="benchmark step time, throughput, MFU, compile time and "
                                     "memory, beside a PyTorch reference")
    b.add_argument("--set", action="append", help="a set of cases in the cases file "
                                                  "(cpu, memory, accelerator); repeatable")
    b.add_argument("--cases", nargs="+", help="case names to run (with --set: cases of those "
                                              "sets)")
    b.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    b.add_argument("--torch-steps", type=int, help="timed steps for PyTorch (default --steps)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--profile", action="store_true", help="write a jax.profiler trace per case")
    b.add_argument("--pipeline", action="store_true",
                   help="benchmark the input pipeline alone (the cases file's pipeline list)")
    b.add_argument("--finetune", action="store_true",
                   help="benchmark finetuning strategies (the cases file's finetune list)")
    b.add_argument("--fake-cpu-devices", type=at_least(1, "CPU devices to fake"), default=0,
                   help="on a CPU, fake this many devices (for the memory set: 8)")
    b.add_argument("--cases-file", help="a cases YAML (default: the one that ships with ptft, "
                                        "ptft_jax/bench/cases.yaml)")
    b.add_argument("--out", help="results folder, one subfolder per device (default: "
                                 "benchmarks/results in a source checkout, else under the "
                                 "working directory)")
    x = sub.add_parser("experiment", help="experiments that train several runs and compare "
                                          "them")
    x.add_argument("name", choices=["pretrain-vs-end-to-end"],
                   help="pretrain-vs-end-to-end: pretrain the towers apart, align them, or "
                        "train the fused model end to end, under equal training FLOPs")
    x.add_argument("--config", "-c", required=True, help="an experiment config (see "
                                                         "configs/experiment_emoji.yaml)")
    sw = sub.add_parser("sweep", help="hyperparameter search over any config keys (grid, "
                                      "random or TPE; pruning; a study several processes "
                                      "and hosts share); every trial is a run directory")
    sw.add_argument("--config", "-c", required=True, help="the config every trial starts from")
    sw.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, "
                                                 "e.g. train.steps=300")
    sw.add_argument("--space", "-s", required=True,
                    help="a YAML of config keys to choices or ranges (see "
                         "configs/sweep_fortunes_space.yaml); a sweep: section may set the "
                         "options below")
    sw.add_argument("--trials", type=int, help="trials to end: complete, pruned or failed "
                                               "(default: the grid's size, else 20)")
    sw.add_argument("--sampler", choices=("grid", "random", "tpe"),
                    help="default tpe (Bayesian)")
    sw.add_argument("--metric", help="the validation metric to optimise (default: the task's "
                                     "eval.metric, e.g. macro_f1)")
    sw.add_argument("--direction", choices=("maximize", "minimize"),
                    help="default: the metric's (loss: minimize, the rest: maximize)")
    sw.add_argument("--pruner", choices=("median", "halving", "none"),
                    help="stop unpromising trials at an evaluation (default median)")
    sw.add_argument("--storage", help="SQLAlchemy URL of the study (default: sqlite:///"
                                      "<dir>/study.db); hosts that share it share the sweep")
    sw.add_argument("--study-name", dest="study_name", help="default: the config's file stem")
    sw.add_argument("--dir", help="where trials and the report go (default runs/sweep_<stem>)")
    sw.add_argument("--workers", type=int, help="trial processes on this machine, each with "
                                                "its own devices (GPUs: one each)")
    sw.add_argument("--seed", type=int, help="the sampler's seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handlers, restore_hook = _stop_on_signals(args.command)
    try:
        return run_command(args)
    except Stopped as e:  # the `with` blocks on the way up have closed what they opened
        print(_stopped_message(args.command, e.name), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not a normal exit: the interpreter's teardown can crash on JAX's threads left in
        # the middle of whatever the signal interrupted (a compile, say).
        os._exit(128 + e.signum)
    except ConfigError as e:
        print(f"ptft {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad input found while reading data or checkpoints
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, say: what ptft wrote before is whole (core/files.py)
        print(f"ptft {args.command}: error: {io_error(e)}", file=sys.stderr)
        return 4 if e.errno in STORAGE_ERRORS else 2
    except KeyboardInterrupt:  # a second signal while training saved and stopped
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        restore_hook()


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside a training loop (which installs its own handlers: it stops
    between steps and saves). A KeyboardInterrupt, so that `except Exception` never catches
    it and the `with` blocks on the way up close what they opened (worker pools)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


def _stopped_message(command: str, name: str) -> str:
    return f"ptft {command}: stopped by {name} " + (
        "during start-up, before the first training step: nothing was trained or saved. Run "
        "the same command to start." if command in ("pretrain", "finetune") else
        "before it finished; no file was left half-written.")


def _stop_on_signals(command: str) -> tuple[dict, Callable[[], None]]:
    """SIGINT and SIGTERM raise Stopped (a SIGTERM would otherwise end the process without a
    word). Where the signal lands inside a callback that swallows exceptions (JAX's gc
    callback does), the process ends by the signal itself, saying so: everything ptft writes
    survives a kill at any moment. Returns the previous handlers, and what puts the previous
    unraisable hook back unless another was installed on top of this one (the checkpoint
    readers' quiet hook, which must outlive the command: Orbax's coroutines raise at exit)."""
    if threading.current_thread() is not threading.main_thread():
        return {}, lambda: None
    previous_hook = sys.unraisablehook

    def stop(signum, frame):
        raise Stopped(signum)

    def swallowed(unraisable):
        if not isinstance(unraisable.exc_value, Stopped):
            return previous_hook(unraisable)
        print(_stopped_message(command, unraisable.exc_value.name), file=sys.stderr, flush=True)
        signal.signal(unraisable.exc_value.signum, signal.SIG_DFL)
        os.kill(os.getpid(), unraisable.exc_value.signum)
    def restore():
        if sys.unraisablehook is swallowed:
            sys.unraisablehook = previous_hook
    sys.unraisablehook = swallowed
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    return handlers, restore


# Failures of the storage rather than of the input: exit code 4, as a failed checkpoint save.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def io_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    hint = (" Free some space (or choose another folder) and run the same command again; "
            "files ptft wrote before are intact." if e.errno in STORAGE_ERRORS else "")
    return f"{where}{e.strerror or e}.{hint}"


if __name__ == "__main__":
    sys.exit(main())
