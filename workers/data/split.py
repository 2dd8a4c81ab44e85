"""Reproducible splits of example indices: training/validation and across nodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .dataset import DatasetError


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
