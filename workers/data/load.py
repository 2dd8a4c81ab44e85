"""``load_dataset(spec, sandbox)``: a built-in name, inline JSON, or user files.

* a built-in name (``BUILTIN_DATASETS``);
* inline JSON (see :mod:`workers.data.formats`);
* a path, directory or glob of ``.csv``/``.tsv``, ``.jsonl``/``.ndjson``, ``.json``,
  ``.txt`` files (optionally ``.gz``); relative paths resolve against ``sandbox``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from pathlib import Path

from ..protocol import BUILTIN_DATASETS
from .builtin import builtin_key, load_builtin
from .dataset import Dataset, DatasetError
from .files import has_glob, load_files, resolve_paths
from .formats import load_inline

log = logging.getLogger(__name__)


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


def load_dataset(spec: str, sandbox: Path | None = None) -> Dataset:
    """Load a built-in dataset, inline JSON or user files (relative paths under ``sandbox``).

    Raises :class:`DatasetError` with a message for the user when the spec cannot load.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("no dataset given: name a built-in dataset, a file, or give inline JSON")
    key = builtin_key(spec)
    if key is not None:
        return load_builtin(key)
    if _is_inline(spec):
        return load_inline(spec)
    paths = resolve_paths(spec, sandbox)
    if not paths:
        raise _not_found(spec, sandbox)
    t0 = time.perf_counter()
    name = paths[0].name if len(paths) == 1 and not has_glob(spec) else spec.strip()
    ds = load_files(paths, name)
    log.info("loaded %s from %d file(s) in %.2f s", ds.summary(), len(paths), time.perf_counter() - t0)
    return ds
