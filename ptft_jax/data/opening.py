"""Opening a corpus: `open_documents(cfg.data)` turns `data.corpus` into `Documents`.

Each kind of source (bundled, local files, a Hugging Face hub dataset, TFDS) gets only the
cheap checks here, in order, before any data is read: the path or id, the format, the columns,
the split, whether the hub is reachable. Each failure is one ValueError naming the file or
dataset and what to do. The `Documents` classes themselves live in sources.py.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
from pathlib import Path

import numpy as np

from ptft_jax.config.schema import DataConfig
from ptft_jax.config.validate import local_files
from ptft_jax.data.source_checks import not_utf8, require_columns, require_text_type, some_paths
from ptft_jax.data.sources import (BUNDLED, BUNDLED_LABELLED, EXTENSIONS, ColumnFiles, Documents,
                                   HubDataset, TextFiles, TfdsSource)


def eval_split_of(data) -> str:
    """The split evaluation reads: data.eval_split, except that local files named by
    data.eval_corpus are one split whatever the (shipped) eval_split says."""
    return "train" if local_files(data.eval_corpus) else (data.eval_split or "train")


def open_documents(cfg: DataConfig, split: str | None = None) -> Documents:
    """The documents of `cfg.corpus` (split defaults to `cfg.split`). Raises ValueError, naming
    the file or dataset and what to do, for anything wrong that can be seen without reading
    the data."""
    split = cfg.split if split is None else split
    corpus = cfg.corpus
    if corpus.startswith("hf:"):
        return _open_hub(corpus[len("hf:"):], split, cfg.text_column, cfg.label_column)
    if corpus.startswith("tfds:"):
        return _open_tfds(corpus[len("tfds:"):], split, cfg.text_column, cfg.label_column)
    if cfg.format != "auto" and cfg.format not in EXTENSIONS:
        raise ValueError(f"data.format '{cfg.format}' is unknown; use auto (from the file "
                         f"extension) or one of: {', '.join(EXTENSIONS)}.")
    if corpus.startswith("bundled:") and corpus[len("bundled:"):] in BUNDLED_LABELLED:
        return _open_bundled_labelled(corpus, split, cfg.text_column, cfg.label_column)
    if corpus.startswith("bundled:"):
        paths, fmt = [_bundled(corpus)], "text"
    else:
        paths, fmt = _local_files(corpus, cfg.format)
    if split != "train":
        raise ValueError(f"'{corpus}' is local files, which have one split, but split "
                         f"'{split}' was asked for (data.split / data.eval_split): give labelled "
                         f"evaluation files as data.eval_corpus=FILE (data.eval_split is then "
                         f"not used), or set data.eval_split=null to train without evaluation.")
    if fmt == "text":
        if cfg.label_column is not None:
            raise ValueError(f"data.corpus '{corpus}' is text files (one document per line), "
                             f"which have no label column; set data.label_column=null, or use "
                             f"jsonl, csv or parquet files with a '{cfg.label_column}' column.")
        return TextFiles(paths, corpus)
    for path in paths:
        columns = _peek_columns(path, fmt)
        if columns is not None:  # None: a whole-file JSON document, checked once loaded
            require_columns(columns, str(path), cfg.text_column, cfg.label_column)
    return ColumnFiles(paths, fmt, corpus, cfg.text_column, cfg.label_column)



# ---------------------------------------------------------------------------------------------
# Opening each kind of source: the cheap checks, in order, before any data is read


def _bundled(corpus: str) -> Path:
    name = corpus.split(":", 1)[1]
    if name not in BUNDLED:
        known = [*BUNDLED, *BUNDLED_LABELLED]
        raise ValueError(f"data.corpus '{corpus}': no bundled corpus '{name}'. "
                         f"Bundled: {', '.join('bundled:' + n for n in known)}.")
    return BUNDLED[name]


def _open_bundled_labelled(corpus: str, split: str, text_column: str,
                           label_column: str | None) -> Documents:
    """A bundled labelled set: gzipped JSON lines with 'text' and 'label', a file per split."""
    files = BUNDLED_LABELLED[corpus.split(":", 1)[1]]
    if split not in files:
        raise ValueError(f"data.corpus '{corpus}' has the splits {', '.join(files)}; "
                         f"asked for '{split}'.")
    require_columns(["text", "label"], corpus, text_column, label_column)
    return ColumnFiles([files[split]], "jsonl", f"{corpus}[{split}]", text_column, label_column)


def _format_of(path: Path) -> str | None:
    for fmt, extensions in EXTENSIONS.items():
        if path.name.lower().endswith(extensions):
            return fmt
    return None


def _local_files(corpus: str, fmt: str) -> tuple[list[Path], str]:
    """The files `corpus` names (a file, a folder or a glob), sorted, and their format."""
    pattern = os.path.expanduser(corpus)
    path = Path(pattern)
    if any(c in pattern for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif path.is_dir():
        # Every supported file in the folder and its subfolders; hidden ones are skipped.
        wanted = EXTENSIONS.get(fmt) or tuple(e for exts in EXTENSIONS.values() for e in exts)
        paths = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(wanted)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not paths:
            raise ValueError(f"data.corpus '{corpus}': the folder holds no "
                             f"{'' if fmt == 'auto' else fmt + ' '}files with a supported "
                             f"extension ({', '.join(wanted)}). Point data.corpus at the files, "
                             f"or set data.format.")
    elif path.is_file():
        paths = [path]
    else:
        paths = []
    if not paths:
        raise ValueError(f"data.corpus '{corpus}' is not a file, a folder, or a glob that "
                         f"matches a file. Give a path or glob of .txt, .txt.gz, .jsonl, .csv "
                         f"or .parquet files, 'hf:NAME', 'tfds:NAME' or 'bundled:kjv'.")
    if fmt == "auto":
        formats = {p: _format_of(p) for p in paths}
        unknown = [p for p, f in formats.items() if f is None]
        if unknown:
            raise ValueError(f"data.corpus '{corpus}': cannot tell the format of "
                             f"{some_paths(unknown)} from the extension. Set data.format to one of "
                             f"{', '.join(EXTENSIONS)}, or narrow the glob.")
        found = sorted(set(formats.values()))
        if len(found) > 1:
            example = path / ("*" + EXTENSIONS[found[0]][0])
            raise ValueError(f"data.corpus '{corpus}' mixes formats ({', '.join(found)}). Use "
                             f"a glob of one kind (e.g. '{example}') or set data.format.")
        fmt = found[0]
    for p in paths:
        if p.stat().st_size == 0:
            raise ValueError(f"{p} is empty (0 bytes). Remove it from data.corpus "
                             f"'{corpus}', or re-create it.")
    return paths, fmt


def _peek_columns(path: Path, fmt: str) -> list[str] | None:
    """The column names of one file, from its header, first record or schema; None for a JSON
    file that is one document (its columns are known only once it is loaded)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e}).") from None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "csv":
                return next(csv.reader(f), [])
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return list(record) if isinstance(record, dict) else None
    except UnicodeDecodeError as e:
        raise not_utf8(path, f"near the start: {e.reason}") from None
    return None


def _split_names(split: str) -> list[str]:
    """'train[:10%]+test' -> ['train', 'test'] (the HF and TFDS split syntax)."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _require_split(split: str, available, where: str) -> None:
    missing = [s for s in _split_names(split) if s not in available]
    if missing:
        raise ValueError(f"{where} has no split '{missing[0]}'. Its splits: "
                         f"{', '.join(available)}. Set data.split=<one of them>.")


def _open_hub(spec: str, split: str, text_column: str, label_column: str | None) -> Documents:
    """`hf:NAME`, `hf:OWNER/NAME` or `hf:OWNER/NAME/CONFIG`. Loads (and on first use
    downloads) the split into the HF cache. When the hub cannot be reached, only the local
    cache is tried, so an offline machine fails in seconds instead of retrying for minutes."""
    ds, name = load_hub_split(spec, split, (text_column, label_column))
    require_columns(ds.column_names, name, text_column, label_column)
    require_text_type(ds, name, text_column)
    return HubDataset(ds, name, text_column, label_column)


def load_hub_split(spec: str, split: str, columns) -> tuple:
    """(datasets.Dataset, name) of one split of `hf:{spec}`, with `columns` (None entries
    skipped) checked; offline, only the local HF cache is tried."""
    import datasets
    from huggingface_hub import constants
    parts = spec.split("/")
    if not spec or len(parts) > 3 or not all(parts):
        raise ValueError(f"data.corpus 'hf:{spec}' is not a dataset name: use hf:NAME, "
                         f"hf:OWNER/NAME or hf:OWNER/NAME/CONFIG (e.g. hf:stanfordnlp/imdb).")
    repo, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (spec, None)
    name = f"hf:{spec}[{split}]"
    if datasets.config.HF_HUB_OFFLINE:
        offline = "offline mode is on: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set"
    elif not _hub_reachable(constants.ENDPOINT):
        offline = f"{constants.ENDPOINT} does not answer"
    else:
        offline = None
    with _hub_offline_mode() if offline else contextlib.nullcontext():
        try:
            builder = datasets.load_dataset_builder(repo, config)
        except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError included
            if offline or isinstance(e, ConnectionError):
                raise ValueError(_hub_unreachable(spec, repo, config, split,
                                                  offline or str(e))) from None
            raise ValueError(f"data.corpus 'hf:{spec}': no dataset '{repo}' on the Hugging "
                             f"Face hub ({e}). Check the name at https://huggingface.co/"
                             f"datasets, or log in (`hf auth login`) if it is gated.") from None
        if builder.info.splits:
            _require_split(split, list(builder.info.splits), f"hf:{spec}")
        if builder.info.features:
            require_columns(list(builder.info.features), name, *columns)
        builder.download_and_prepare()
        try:
            ds = builder.as_dataset(split=split)
        except ValueError as e:  # splits were unknown before preparing: HF names them now
            raise ValueError(f"{name}: {e} Set data.split=<one of them>.") from None
    return ds, name


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (any HTTP status), through huggingface_hub's own HTTP
    session so proxies apply; no retries."""
    from huggingface_hub import get_session
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # DNS, connection, TLS, timeout: all mean "not reachable from here"
        return False
    return True


@contextlib.contextmanager
def _hub_offline_mode():
    """HF offline mode for the duration (a cached dataset still loads), as HF_DATASETS_OFFLINE=1
    would give; both libraries read these flags at call time."""
    import datasets
    from huggingface_hub import constants
    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = before


def _hub_unreachable(spec: str, repo: str, config: str | None, split: str, reason: str) -> str:
    args = repr(repo) + (f", {config!r}" if config else "")
    out = f"{repo.replace('/', '_')}-{split}.parquet"
    return (f"data.corpus 'hf:{spec}': could not reach the Hugging Face hub ({reason}), and "
            f"the dataset is not in the local HF cache. Use local files instead: where the hub "
            f"is reachable, run `python -c \"import datasets; datasets.load_dataset({args}, "
            f"split={split!r}).to_parquet({out!r})\"`, copy {out} here, and set "
            f"data.corpus=path/to/*.parquet.")


def _open_tfds(spec: str, split: str, text_column: str, label_column: str | None) -> Documents:
    """`tfds:NAME[/CONFIG][:VERSION]`: a dataset already prepared (in array_record format)
    under TFDS_DATA_DIR or ~/tensorflow_datasets. What `tfds.data_source(spec, split=split,
    data_dir=..., download=False)` does, with each failure explained: it is never downloaded
    or built here."""
    builder, features, name = tfds_builder(spec, split, (text_column, label_column))
    feature = features[text_column]
    if feature.shape != () or np.dtype(feature.np_dtype).kind not in "OSU":
        raise ValueError(f"tfds:{spec}: feature '{text_column}' holds {feature}, not text. Set "
                         f"data.text_column to a text feature.")
    source, identity = tfds_data_source(builder, split)
    return TfdsSource(source, name, text_column, label_column, identity)


def tfds_builder(spec: str, split: str, columns) -> tuple:
    """(builder, features, name) of a prepared, randomly accessible `tfds:{spec}` split whose
    features hold `columns` (None entries skipped); every failure explained."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters
    # tfds reads TFDS_DATA_DIR once, at import; read it now so the current value counts.
    data_dir = os.environ.get("TFDS_DATA_DIR")
    where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR to look elsewhere)"
    prepare = (f"Prepare it where the network is reachable with `tfds build {spec} "
               f"--file_format=array_record --data_dir=DIR`, then set TFDS_DATA_DIR=DIR.")
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"data.corpus 'tfds:{spec}': no such dataset registered with tfds, "
                         f"nor prepared in {where}. {prepare}") from None
    if not builder.is_prepared():
        raise ValueError(f"data.corpus 'tfds:{spec}' is not prepared in {builder.data_dir}. "
                         f"{prepare}")
    if builder.info.file_format not in file_adapters.FileFormat.with_random_access():
        raise ValueError(f"data.corpus 'tfds:{spec}' is prepared as "
                         f"{builder.info.file_format or 'tfrecord'} in {builder.data_dir}, "
                         f"which has no random access and needs TensorFlow. Rebuild it with "
                         f"--file_format=array_record.")
    name = f"tfds:{spec}[{split}]"
    _require_split(split, list(builder.info.splits), f"tfds:{spec}")
    features = builder.info.features
    require_columns(list(features.keys()), f"tfds:{spec}", *columns)
    return builder, features, name


def tfds_data_source(builder, split: str) -> tuple:
    """(random-access data source, identity for fingerprints) of a prepared split."""
    source = builder.as_data_source(split=split)
    info_file = Path(builder.data_dir) / "dataset_info.json"
    identity = (builder.info.full_name, split, str(builder.data_dir),
                info_file.stat().st_mtime_ns if info_file.exists() else 0)
    return source, identity


# ---------------------------------------------------------------------------------------------
# Hub datasets of images (image_sources.py, pairs.py)


def require_image_columns(columns, where: str, image_column: str, label_column: str) -> None:
    for key, column in (("data.image_column", image_column), ("data.label_column", label_column)):
        if column not in columns:
            raise ValueError(f"{where} has no column '{column}' ({key}). Its columns: "
                             f"{', '.join(map(str, columns)) or '(none)'}. Set {key}=<one of "
                             f"them>.")


def open_hub_images(spec, split, image_column, label_column):
    ds, name = load_hub_split(spec, split, (None, None))
    require_image_columns(ds.column_names, name, image_column, label_column)
    return ds, name
