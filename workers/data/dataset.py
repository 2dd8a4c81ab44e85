"""The in-memory dataset every loader returns, and the checks a dataset must pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["vectors", "images", "text", "lm"]


class DatasetError(ValueError):
    """A dataset spec that cannot be loaded; the message is shown to the user as is."""


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


def check_dataset(ds: Dataset) -> Dataset:
    """``ds`` itself when it is usable for training; raises :class:`DatasetError` saying why not."""
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
