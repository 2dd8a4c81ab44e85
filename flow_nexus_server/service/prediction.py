"""Server-side prediction maths: combine per-node probabilities, score, split batches.

Pure functions over numpy arrays (no torch, no MCP), used by distributed prediction.
Each node answers a batch with softmax probabilities ``(n, classes)``; :func:`combine` turns
those answers into one prediction per example with one of the Flow Nexus aggregation rules:

* ``mean``: arithmetic mean of the class probabilities (weighted by ``node_weights`` if given);
  the winner is the arg-max (the lower index among classes equal up to rounding), its
  confidence the combined probability.
* ``majority``: each node votes for its arg-max class; most votes wins, ties between classes
  broken by the tied classes' summed probability over nodes (then by the lower index); the
  confidence is the winner's vote share.
* ``weighted``: confidence-weighted vote: each node adds its confidence (its max probability)
  to the class it votes for; the distribution is the normalised vote mass, ties broken as for
  majority; the confidence is the winner's share of the mass.
* ``ensemble``: probability averaging as ``mean``, and the reply additionally lists every
  node's vote and confidence per example.

For every rule the result also says the ``agreement``: the share of nodes whose arg-max is the
winner (each node counted once, whatever its weight).

Unlike the Flow Nexus original, a missing method is never undefined: callers pass one of the
four names (the tool layer applies the default ``mean``), and anything else is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from workers.metrics import macro_f1, per_class_f1

from .errors import ServiceError

__all__ = [
    "METHODS",
    "Combined",
    "Method",
    "PredictionError",
    "classification_report",
    "combine",
    "shard_indices",
]

Method = Literal["mean", "majority", "weighted", "ensemble"]
METHODS: tuple[str, ...] = get_args(Method)

ROW_SUM_TOLERANCE = 1e-3
"""How far a node's probability row may be from summing to 1 before it is rejected."""


class PredictionError(ServiceError, ValueError):
    """Node answers or labels that cannot be combined or scored; the message says why."""


@dataclass
class Combined:
    """The combined prediction for a batch of ``n`` examples from ``k`` nodes."""

    method: str
    predictions: np.ndarray  # (n,) int64: winning class per example
    confidence: np.ndarray  # (n,) float64: combined probability / vote share of the winner
    distribution: np.ndarray  # (n, classes) float64, rows sum to 1
    agreement: np.ndarray  # (n,) float64: share of nodes whose arg-max is the winner
    node_votes: np.ndarray  # (n, k) int64: each node's arg-max
    node_confidences: np.ndarray  # (n, k) float64: each node's max probability

    @property
    def num_nodes(self) -> int:
        return int(self.node_votes.shape[1])

    def __len__(self) -> int:
        return int(self.predictions.shape[0])

    def examples(self, label_names: Sequence[str] | None = None,
                 node_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per example: prediction (index), label (name when ``label_names``),
        confidence, agreement, distribution; for ``ensemble`` also ``nodes`` with each node's
        vote and confidence."""
        names = list(label_names) if label_names is not None else None
        ids = list(node_ids) if node_ids is not None else [str(j) for j in range(self.num_nodes)]
        if len(ids) != self.num_nodes:
            raise PredictionError(f"{len(ids)} node ids for {self.num_nodes} nodes")
        if names is not None and len(names) != self.distribution.shape[1]:
            raise PredictionError(
                f"{len(names)} label names for {self.distribution.shape[1]} classes"
            )
        out: list[dict[str, Any]] = []
        for i in range(len(self)):
            p = int(self.predictions[i])
            ex: dict[str, Any] = {
                "prediction": p,
                "confidence": float(self.confidence[i]),
                "agreement": float(self.agreement[i]),
                "distribution": [float(v) for v in self.distribution[i]],
            }
            if names is not None:
                ex["label"] = names[p]
            if self.method == "ensemble":
                nodes = []
                for j, node in enumerate(ids):
                    vote = int(self.node_votes[i, j])
                    entry: dict[str, Any] = {"node_id": node, "prediction": vote,
                                             "confidence": float(self.node_confidences[i, j])}
                    if names is not None:
                        entry["label"] = names[vote]
                    nodes.append(entry)
                ex["nodes"] = nodes
            out.append(ex)
        return out


def _as_probabilities(per_node: Sequence[Any]) -> np.ndarray:
    """Stack node answers into (k, n, c) float64, checked and renormalised."""
    if isinstance(per_node, np.ndarray) and per_node.ndim == 3:
        per_node = list(per_node)
    if not isinstance(per_node, (list, tuple)) or len(per_node) == 0:
        raise PredictionError("no node answered: combine needs at least one node's probabilities")
    arrays = []
    for j, a in enumerate(per_node):
        try:
            arr = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError):
            raise PredictionError(f"node {j}'s answer is not a numeric array") from None
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2:
            raise PredictionError(
                f"node {j}'s answer has shape {arr.shape}; expected (examples, classes)"
            )
        arrays.append(arr)
    shape = arrays[0].shape
    for j, arr in enumerate(arrays[1:], 1):
        if arr.shape != shape:
            raise PredictionError(
                f"node {j} answered shape {arr.shape} but node 0 answered {shape}; every node "
                "must answer the same examples with the same classes"
            )
    if shape[0] == 0:
        raise PredictionError("no examples to combine")
    if shape[1] == 0:
        raise PredictionError("the answers have no classes")
    p = np.stack(arrays)
    if not np.isfinite(p).all():
        j = int(np.flatnonzero(~np.isfinite(p).reshape(len(p), -1).all(axis=1))[0])
        raise PredictionError(f"node {j}'s answer holds NaN or infinity")
    if (p < -1e-9).any():
        j = int(np.flatnonzero((p < -1e-9).reshape(len(p), -1).any(axis=1))[0])
        raise PredictionError(f"node {j}'s answer holds negative values; send probabilities")
    sums = p.sum(axis=2)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if bad.any():
        j, i = (int(v) for v in np.argwhere(bad)[0])
        raise PredictionError(
            f"node {j}'s row {i} sums to {sums[j, i]:.4g}, not 1; nodes must send softmax "
            "probabilities, not logits"
        )
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=2, keepdims=True)


def _weights(node_weights: Sequence[float] | None, k: int) -> np.ndarray:
    if node_weights is None:
        return np.ones(k, dtype=np.float64)
    try:
        w = np.asarray(node_weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise PredictionError("node_weights must be numbers") from None
    if w.shape[0] != k:
        raise PredictionError(f"{w.shape[0]} node weights for {k} nodes; give one per node")
    if not np.isfinite(w).all() or (w < 0).any():
        raise PredictionError("node weights must be finite and non-negative")
    if w.sum() <= 0:
        raise PredictionError("node weights sum to 0; at least one node needs a positive weight")
    return w


def _near_max(a: np.ndarray) -> np.ndarray:
    """Mask of the entries equal to their row's maximum up to rounding."""
    top = a.max(axis=1, keepdims=True)
    return a >= top - 1e-12 * np.maximum(1.0, np.abs(top))


def _break_ties(scores: np.ndarray, prob_sum: np.ndarray) -> np.ndarray:
    """Arg-max of ``scores`` per row; among classes tied up to rounding the largest
    ``prob_sum`` wins (again up to rounding), then the lowest index. Comparing up to rounding
    keeps the answer independent of the order of the nodes."""
    key = np.where(_near_max(scores), prob_sum, -np.inf)
    return _near_max(key).argmax(axis=1).astype(np.int64)


def combine(per_node: Sequence[Any], method: Method,
            node_weights: Sequence[float] | None = None) -> Combined:
    """Combine per-node probability arrays (each ``(n, classes)``) into one prediction per
    example with ``method`` (see the module docstring). ``node_weights`` (one non-negative
    number per node, e.g. validation accuracy or sample count) scale each node's
    contribution; ``agreement`` always counts nodes equally. Raises :class:`PredictionError`
    for an unknown method, mismatched shapes, or rows that are not probabilities."""
    if method not in METHODS:
        raise PredictionError(
            f"unknown aggregation {method!r}; use one of {', '.join(METHODS)}"
        )
    p = _as_probabilities(per_node)  # (k, n, c)
    k, n, c = p.shape
    w = _weights(node_weights, k)
    votes = p.argmax(axis=2).T.astype(np.int64)  # (n, k)
    confs = p.max(axis=2).T  # (n, k)
    prob_sum = np.einsum("k,knc->nc", w, p)  # weighted summed probability per class
    onehot = np.zeros((n, k, c), dtype=np.float64)
    onehot[np.arange(n)[:, None], np.arange(k)[None, :], votes] = 1.0
    if method in ("mean", "ensemble"):
        dist = prob_sum / w.sum()
        pred = _break_ties(dist, dist)
    else:
        per_vote = w[None, :] * (confs if method == "weighted" else 1.0)  # (n, k)
        scores = np.einsum("nk,nkc->nc", per_vote, onehot)
        dist = scores / scores.sum(axis=1, keepdims=True)  # > 0: every node votes, sum(w) > 0
        pred = _break_ties(scores, prob_sum)
    confidence = dist[np.arange(n), pred]
    agreement = (votes == pred[:, None]).mean(axis=1)
    return Combined(
        method=method,
        predictions=pred,
        confidence=confidence,
        distribution=dist,
        agreement=agreement,
        node_votes=votes,
        node_confidences=confs,
    )


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def _label_array(y: Any, names: list[str] | None, what: str) -> np.ndarray:
    values = list(np.asarray(y).reshape(-1).tolist()) if not isinstance(y, (list, tuple)) else list(y)
    out = np.empty(len(values), dtype=np.int64)
    index = {n: i for i, n in enumerate(names)} if names is not None else {}
    for i, v in enumerate(values):
        if isinstance(v, str):
            if v in index:
                out[i] = index[v]
                continue
            known = ", ".join(names) if names else "none given"
            raise PredictionError(f"{what}[{i}] is {v!r}, not a known label (labels: {known})")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise PredictionError(f"{what}[{i}] is {v!r}; labels are class indices or names")
        if v < 0 or (names is not None and v >= len(names)):
            top = f" 0-{len(names) - 1}" if names else ""
            raise PredictionError(f"{what}[{i}] = {v} is not a class index{top}")
        out[i] = v
    return out


def classification_report(y_true: Any, y_pred: Any,
                          label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1 and the confusion matrix.

    Labels are class indices (or names from ``label_names``). The macro means run over the
    classes that occur in ``y_true`` or ``y_pred`` (a class with no support and no predictions
    is left out), with 0 for an undefined precision or recall: the same numbers as sklearn's
    ``precision_recall_fscore_support(average="macro", zero_division=0)``. The confusion
    matrix covers every class in ``label_names`` (rows true, columns predicted).
    """
    names = [str(n) for n in label_names] if label_names is not None else None
    t = _label_array(y_true, names, "y_true")
    p = _label_array(y_pred, names, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise PredictionError(f"{t.shape[0]} true labels but {p.shape[0]} predictions")
    if t.shape[0] == 0:
        raise PredictionError("no examples to score")
    if names is None:
        names = [str(i) for i in range(int(max(t.max(), p.max())) + 1)]
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
    fp, fn = predicted - tp, support - tp
    f1 = per_class_f1(tp, fp, fn)
    present = (support > 0) | (predicted > 0)
    per_class = [
        {"label": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
         "f1": float(f1[c]), "support": int(support[c]), "predicted": int(predicted[c])}
        for c in range(k)
    ]
    return {
        "accuracy": float(tp.sum() / t.shape[0]),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": macro_f1(tp, fp, fn),
        "support": int(t.shape[0]),
        "label_names": names,
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


# --------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------


def shard_indices(n: int, k: int) -> list[slice]:
    """Split ``range(n)`` into ``k`` contiguous slices, in order, whose sizes differ by at most
    one (the first ``n % k`` get the extra example). When ``n < k`` the last ``k - n`` slices
    are empty: skip those nodes. Concatenating the nodes' answers in slice order restores the
    batch order."""
    n, k = int(n), int(k)
    if n < 0:
        raise PredictionError(f"cannot shard {n} examples")
    if k < 1:
        raise PredictionError(f"cannot shard across {k} nodes; need at least one")
    base, extra = divmod(n, k)
    out: list[slice] = []
    start = 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out
