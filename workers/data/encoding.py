"""Raw values to a checked :class:`Dataset`: class indices from labels, arrays from numbers.

Labels: non-negative integer labels below 1000 are used as class indices directly
(``label_names = ["0", ..., str(max)]``) so that every node reading its own file agrees on
the index of a class; other integers are remapped in sorted order; any other strings become
sorted label names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .dataset import Dataset, DatasetError, Kind, check_dataset

MAX_DIRECT_CLASS_ID = 1000
"""Non-negative integer labels below this are class indices as given; others are remapped."""


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
            raise DatasetError(f"{where}: label of example {i + 1} is {json.dumps(v)[:40]}, "
                               "expected a class id or name")
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

    numeric = [s for s in norm if is_float(s)]
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


def is_float(s: str) -> bool:
    """Whether ``s`` parses as a number."""
    try:
        float(s)
        return True
    except ValueError:
        return False


def numeric_features(rows: Any, where: str) -> tuple[np.ndarray, Kind]:
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


def labelled(name: str, kind: Kind, X: Any, raw_labels: Sequence[Any] | None, where: str) -> Dataset:
    """A checked dataset of features ``X`` and raw labels; text without labels becomes a
    language-modelling corpus."""
    if raw_labels is None:
        if kind != "text":
            raise DatasetError(f"{where}: no labels found; numeric features need a label for every example")
        return check_dataset(Dataset(name, "lm", list(X), None, []))
    if len(X) != len(raw_labels):
        raise DatasetError(
            f"{where}: {len(X)} examples but {len(raw_labels)} labels; the lengths must match"
        )
    y, names = _encode_labels(raw_labels, where)
    return check_dataset(Dataset(name, kind, X, y, names))
