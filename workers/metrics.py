"""Classification scores from per-class counts, shared by the node's validation and the
server's prediction report (numpy only, so the server can import it without torch)."""

from __future__ import annotations

import numpy as np


def per_class_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 of every class; 0 for a class that occurs neither in the labels nor in the predictions."""
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 0.0)


def macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (sklearn's
    ``f1_score(average="macro", zero_division=0)``); 0 when there are none."""
    present = 2 * tp + fp + fn > 0
    if not present.any():
        return 0.0
    return float(per_class_f1(tp, fp, fn)[present].mean())
