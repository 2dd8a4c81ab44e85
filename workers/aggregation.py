"""Robust aggregation rules for federated training.

Following Flower's *Strategy* idea, every rule is a small pure function over a stack of
client updates ``W`` of shape ``(n, d)``: one row per client, all layers flattened and
concatenated. Nothing here touches the network or mutates its inputs.

Rules (the textbook formulae; ``m_i`` = client weight, usually its number of training examples):

* ``fedavg``        w = sum_i m_i w_i / sum_i m_i
* ``median``        w[c] = median_i w_i[c]                       (unweighted)
* ``trimmed_mean``  per coordinate drop the k = floor(beta * n) smallest and k largest
                    values, average the remaining n - 2k          (unweighted)
* ``krum``          D_ij = ||w_i - w_j||^2, k = max(1, n - f - 2),
                    score_i = sum of the k smallest D_ij over j != i, return w_argmin
* ``multi_krum``    the m lowest-scoring updates, combined by weighted FedAvg

Arithmetic is done in float64; the result has the input's floating dtype (float64 for
integer input). Pairwise distances use the Gram identity ||x||^2 + ||y||^2 - 2 x.y in float64
on centred updates (distances are translation invariant, and centring removes
most of the cancellation when all updates are close to a common model), clipped at 0. The
centre is the coordinate median, so one huge update cannot drag it away from the others.

Non-finite values (NaN, +/-inf) -- the policy, per rule:

* ``fedavg`` (and ``multi_krum``'s weighted mean, which only ever sees selected updates)
  rejects non-finite updates with an :class:`AggregationError` naming them.
* ``median`` and ``trimmed_mean`` treat a non-finite entry as a *missing value* for that
  coordinate (``np.nanmedian``-like): each coordinate is aggregated over its finite values
  only, and for the trimmed mean k = floor(beta * c) where c is the number of finite values in
  that coordinate (c = n when everything is finite, i.e. the textbook rule). A coordinate
  with no finite value at all raises.
* ``krum`` / ``multi_krum`` give every distance involving an update that holds any non-finite
  value the value +inf, so its score is +inf; finite updates always rank before non-finite
  ones, so such an update is never selected. If fewer finite updates exist than must be
  selected, it raises.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "AggregationError",
    "RULES",
    "aggregate",
    "coordinate_median",
    "fedavg",
    "krum",
    "krum_scores",
    "multi_krum",
    "reputation_update",
    "trimmed_mean",
]


class AggregationError(ValueError):
    """Invalid aggregation input; the message is meant to be shown to the user as is."""


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Stack:
    """Validated updates: ``w`` float64 (n, d) view/copy, ``orig`` the input as an array."""

    w: np.ndarray
    orig: np.ndarray
    out_dtype: np.dtype
    finite_rows: np.ndarray  # bool (n,): row holds only finite values

    @property
    def n(self) -> int:
        return int(self.w.shape[0])

    @property
    def d(self) -> int:
        return int(self.w.shape[1])

    def nonfinite_indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.finite_rows)]


def _as_stack(updates: Any) -> _Stack:
    if isinstance(updates, np.ndarray) or torch.is_tensor(updates):
        arr = _to_numpy(updates)
    else:
        try:
            items = list(updates)
        except TypeError:
            raise AggregationError(
                f"updates must be an (n, d) array or a sequence of 1-D vectors; "
                f"got {type(updates).__name__}"
            ) from None
        if not items:
            raise AggregationError("no updates to aggregate (got an empty stack, n=0)")
        vecs = [_to_numpy(x) for x in items]
        for i, v in enumerate(vecs):
            if v.ndim != 1:
                raise AggregationError(
                    f"each update must be a 1-D vector; update {i} has shape {tuple(v.shape)}"
                )
        lengths = [int(v.shape[0]) for v in vecs]
        if len(set(lengths)) > 1:
            j = next(i for i, length in enumerate(lengths) if length != lengths[0])
            raise AggregationError(
                f"updates have different lengths: update 0 has {lengths[0]} values, "
                f"update {j} has {lengths[j]} (all {len(vecs)} updates must have the same length)"
            )
        arr = np.stack(vecs)
    if arr.ndim != 2:
        raise AggregationError(
            f"updates must be a 2-D stack (n, d), one flattened vector per client; "
            f"got shape {tuple(arr.shape)}"
        )
    n, d = arr.shape
    if n == 0:
        raise AggregationError("no updates to aggregate (got an empty stack, n=0)")
    if d == 0:
        raise AggregationError(f"updates are empty vectors (n={n}, d=0)")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise AggregationError(f"updates must be real numbers; got dtype {arr.dtype}")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    w = np.asarray(arr, dtype=np.float64)
    finite_rows = np.isfinite(w).all(axis=1)
    return _Stack(w=w, orig=arr, out_dtype=np.dtype(out_dtype), finite_rows=finite_rows)


def _to_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy()
    try:
        return np.asarray(x)
    except ValueError as exc:  # ragged nested lists
        raise AggregationError(f"updates have inconsistent shapes ({exc})") from None


def _require_finite(s: _Stack, rule: str) -> None:
    if not s.finite_rows.all():
        bad = s.nonfinite_indices()
        raise AggregationError(
            f"{rule} needs finite updates: update(s) {bad} of {s.n} contain NaN or inf "
            f"(use a robust rule such as median, trimmed_mean or krum to tolerate them)"
        )


def _check_weights(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    try:
        w = np.asarray(_to_numpy(weights) if torch.is_tensor(weights) else weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise AggregationError("weights must be a sequence of numbers") from None
    if w.ndim != 1:
        raise AggregationError(f"weights must be 1-D; got shape {tuple(w.shape)}")
    if w.shape[0] != n:
        raise AggregationError(f"got {w.shape[0]} weights for {n} updates")
    if not np.isfinite(w).all():
        i = int(np.flatnonzero(~np.isfinite(w))[0])
        raise AggregationError(f"weights must be finite; weight[{i}] = {w[i]}")
    if (w < 0).any():
        i = int(np.flatnonzero(w < 0)[0])
        raise AggregationError(f"weights must be non-negative; weight[{i}] = {w[i]}")
    if not w.sum() > 0:
        raise AggregationError(f"weights sum to zero (all {n} weights are 0)")
    return w


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise AggregationError(f"{name} must be an integer; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AggregationError(f"{name} must be an integer; got {value!r}") from None


def _check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise AggregationError(f"beta must be a number in [0, 0.5); got {beta!r}") from None
    if not 0.0 <= b < 0.5:
        raise AggregationError(f"beta must be in [0, 0.5); got {beta}")
    return b


def _check_f(f: Any, n: int) -> int:
    f = _check_int("f", f)
    if f < 0:
        raise AggregationError(f"f (assumed number of Byzantine clients) must be >= 0; got {f}")
    if n <= f + 2:
        raise AggregationError(
            f"Krum needs n > f + 2 updates: got n={n} with f={f} "
            f"(need at least {f + 3} updates, or f <= {n - 3})"
        )
    return f


# --------------------------------------------------------------------------- rules


def _weighted_mean(w: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return w.mean(axis=0)
    return (weights @ w) / weights.sum()


def fedavg(updates: Any, weights: Sequence[float] | None = None) -> np.ndarray:
    """Sample-weighted mean: ``sum_i m_i w_i / sum_i m_i`` (plain mean if ``weights`` is None).

    Raises :class:`AggregationError` for non-finite updates, negative/non-finite weights or
    weights that sum to zero.
    """
    s = _as_stack(updates)
    wts = _check_weights(weights, s.n)
    _require_finite(s, "fedavg")
    return _weighted_mean(s.w, wts).astype(s.out_dtype, copy=False)


def _nonfinite_as_nan(s: _Stack) -> np.ndarray:
    if s.finite_rows.all():
        return s.w
    w = s.w.copy()
    w[~np.isfinite(w)] = np.nan
    counts = (~np.isnan(w)).sum(axis=0)
    if (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        raise AggregationError(
            f"coordinate {c} has no finite value in any of the {s.n} updates "
            f"({int((counts == 0).sum())} such coordinates)"
        )
    return w


def coordinate_median(updates: Any) -> np.ndarray:
    """Coordinate-wise median, unweighted; even n averages the two middle values (numpy).

    Non-finite entries are ignored per coordinate (``np.nanmedian`` semantics).
    """
    s = _as_stack(updates)
    w = _nonfinite_as_nan(s)
    out = np.median(w, axis=0) if w is s.w else np.nanmedian(w, axis=0)
    return out.astype(s.out_dtype, copy=False)


def trimmed_mean(updates: Any, beta: float = 0.2) -> np.ndarray:
    """Coordinate-wise trimmed mean (scipy ``trim_mean`` semantics), unweighted.

    k = floor(beta * n) values are dropped at each end of every coordinate, the remaining
    n - 2k are averaged; beta must be in [0, 0.5) so at least one value remains. With n = 4
    and beta = 0.25 this equals the median. Non-finite entries are treated as missing: a
    coordinate with c finite values drops k = floor(beta * c) at each end.
    """
    b = _check_beta(beta)
    s = _as_stack(updates)
    w = _nonfinite_as_nan(s)
    n = s.n
    srt = np.sort(w, axis=0)  # NaN sorts last
    if w is s.w:
        k = int(b * n)
        out = srt[k : n - k].mean(axis=0)
    else:
        counts = (~np.isnan(srt)).sum(axis=0)  # (d,)
        k = np.floor(b * counts).astype(np.int64)
        rows = np.arange(n)[:, None]
        keep = (rows >= k[None, :]) & (rows < (counts - k)[None, :])
        out = np.where(keep, srt, 0.0).sum(axis=0) / (counts - 2 * k)
    return out.astype(s.out_dtype, copy=False)


def _pairwise_sq_distances(s: _Stack) -> np.ndarray:
    """(n, n) float64 squared L2 distances; +inf on the diagonal and for non-finite updates."""
    n = s.n
    d = np.full((n, n), np.inf)
    idx = np.flatnonzero(s.finite_rows)
    if idx.size >= 2:
        x = s.w[idx]
        with np.errstate(over="ignore", invalid="ignore"):
            # Centre on the coordinate median (robust: an outlier cannot drag the centre away).
            x = x - np.median(x, axis=0)
            sq = np.einsum("ij,ij->i", x, x)
            g = x @ x.T
            dd = sq[:, None] + sq[None, :] - 2.0 * g
        dd[np.isnan(dd)] = np.inf  # overflow for astronomically large (but finite) updates
        np.maximum(dd, 0.0, out=dd)
        d[np.ix_(idx, idx)] = dd
    np.fill_diagonal(d, np.inf)
    return d


def _krum_scores(s: _Stack, f: int) -> np.ndarray:
    k = max(1, s.n - f - 2)
    dist = _pairwise_sq_distances(s)
    return np.partition(dist, k - 1, axis=1)[:, :k].sum(axis=1)


def _krum_select(s: _Stack, f: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    scores = _krum_scores(s, f)
    order = np.lexsort((np.arange(s.n), scores, ~s.finite_rows))  # last key is primary
    n_finite = int(s.finite_rows.sum())
    if m > n_finite:
        raise AggregationError(
            f"cannot select {m} update(s): only {n_finite} of {s.n} updates are finite "
            f"(non-finite: {s.nonfinite_indices()})"
        )
    return order[:m], scores


def krum_scores(updates: Any, f: int) -> np.ndarray:
    """Krum score of every update (float64, lower is better).

    score_i = sum of the k = max(1, n - f - 2) smallest squared distances ||w_i - w_j||^2,
    j != i. Updates holding non-finite values score +inf (and count as +inf neighbours).
    """
    s = _as_stack(updates)
    f = _check_f(f, s.n)
    return _krum_scores(s, f)


def krum(updates: Any, f: int) -> np.ndarray:
    """The single update with the lowest Krum score (ties: lowest index), as a copy.

    Requires n > f + 2 (Blanchard et al. assume n >= 2f + 3; like Flower, not enforced).
    """
    s = _as_stack(updates)
    f = _check_f(f, s.n)
    sel, _ = _krum_select(s, f, 1)
    return np.array(s.orig[sel[0]], dtype=s.out_dtype)


def _check_m(m: Any, n: int) -> int:
    m = _check_int("m", m)
    if not 1 <= m <= n:
        raise AggregationError(f"m (updates to keep) must be in [1, n={n}]; got {m}")
    return m


def multi_krum(
    updates: Any, f: int, m: int, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted FedAvg of the m updates with the lowest Krum scores (m = 1 is Krum)."""
    s = _as_stack(updates)
    f = _check_f(f, s.n)
    m = _check_m(m, s.n)
    wts = _check_weights(weights, s.n)
    sel, _ = _krum_select(s, f, m)
    return _multi_krum_mean(s, sel, wts)


def _multi_krum_mean(s: _Stack, sel: np.ndarray, wts: np.ndarray | None) -> np.ndarray:
    ws = None if wts is None else wts[sel]
    if ws is not None and not ws.sum() > 0:
        raise AggregationError(
            f"the {len(sel)} update(s) selected by Multi-Krum ({sorted(int(i) for i in sel)}) "
            f"all have weight 0"
        )
    if len(sel) == 1:  # exactly Krum (w * x / w need not round-trip)
        return np.array(s.orig[sel[0]], dtype=s.out_dtype)
    return _weighted_mean(s.w[sel], ws).astype(s.out_dtype, copy=False)


RULES: dict[str, Callable[..., np.ndarray]] = {
    "fedavg": fedavg,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
}


def aggregate(
    rule: str,
    updates: Any,
    weights: Sequence[float] | None = None,
    *,
    f: int = 1,
    beta: float = 0.2,
    m: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run one rule by name; return ``(aggregate, info)``.

    ``weights`` are used by fedavg and multi_krum (median, trimmed_mean and krum are
    unweighted, but given weights are still validated). ``f`` is used by krum/multi_krum,
    ``beta`` by trimmed_mean, ``m`` by multi_krum (default n - f, i.e. every update presumed
    honest).

    ``info`` (JSON-friendly apart from +inf floats for non-finite updates) holds:
    ``rule``, ``n``, ``d``, ``weighted`` (bool), ``nonfinite`` (indices of updates with any
    NaN/inf), ``rejected`` (indices not used: unselected for krum/multi_krum, the non-finite
    ones for median/trimmed_mean, none for fedavg), ``distances_to_aggregate`` (float
    L2 distance ||w_i - aggregate|| for every update, +inf for non-finite updates), and per
    rule: ``selected``, ``scores``, ``f``, ``m``, ``krum_assumption_met`` (n >= 2f + 3) for
    krum/multi_krum; ``beta`` and ``trimmed_per_side`` (floor(beta * n)) for trimmed_mean.
    """
    if rule not in RULES:
        raise AggregationError(f"unknown aggregation rule {rule!r}; known: {sorted(RULES)}")
    s = _as_stack(updates)
    wts = _check_weights(weights, s.n)
    info: dict[str, Any] = {"rule": rule, "n": s.n, "d": s.d, "weighted": False}
    nonfinite = s.nonfinite_indices()
    if rule == "fedavg":
        _require_finite(s, "fedavg")
        agg = _weighted_mean(s.w, wts)
        info["weighted"] = wts is not None
        rejected: list[int] = []
    elif rule == "median":
        agg = coordinate_median(s.w)
        rejected = nonfinite
    elif rule == "trimmed_mean":
        b = _check_beta(beta)
        agg = trimmed_mean(s.w, b)
        info["beta"] = b
        info["trimmed_per_side"] = int(b * s.n)
        rejected = nonfinite
    else:
        fi = _check_f(f, s.n)
        if rule == "krum":
            mi = 1
        else:
            mi = _check_m(s.n - fi if m is None else m, s.n)
        sel, scores = _krum_select(s, fi, mi)
        if rule == "krum":
            agg = s.w[sel[0]]
        else:
            agg = _multi_krum_mean(s, sel, wts)
            info["weighted"] = wts is not None
        selected = sorted(int(i) for i in sel)
        info.update(
            f=fi,
            m=mi,
            selected=selected,
            scores=[float(x) for x in scores],
            krum_assumption_met=s.n >= 2 * fi + 3,
        )
        chosen = set(selected)
        rejected = [i for i in range(s.n) if i not in chosen]
    agg64 = np.asarray(agg, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        dist = np.sqrt(np.square(s.w - agg64).sum(axis=1))
    dist[~s.finite_rows | np.isnan(dist)] = np.inf
    info["nonfinite"] = nonfinite
    info["rejected"] = rejected
    info["distances_to_aggregate"] = [float(x) for x in dist]
    if rule == "krum":
        out = np.array(s.orig[sel[0]], dtype=s.out_dtype)
    else:
        out = agg64.astype(s.out_dtype)
    return out, info


# --------------------------------------------------------------------------- reputation


def reputation_update(
    old: Mapping[int, float],
    distances: Mapping[int, float],
    rejected: set[int],
    decay: float = 0.9,
    *,
    prior: float = 1.0,
) -> dict[int, float]:
    """Exponential-moving-average reputation in [0, 1].

    For every client i that took part this round (a key of ``distances`` or a member of
    ``rejected``)::

        outlying_i = distances[i] > 3 * median_j(distances[j])   (non-finite distance: outlying;
                     the median is over this round's finite distances)
        target_i   = 0 if i in rejected or outlying_i else 1
        new_i      = decay * old_i + (1 - decay) * target_i

    where ``old_i`` defaults to ``prior`` (1.0: newcomers start trusted) for a client not seen
    before. Clients in ``old`` that did not take part keep their value. Since old_i, target_i
    and decay are all in [0, 1], new_i stays in [0, 1]: accepted clients move toward 1,
    rejected or outlying ones toward 0, by a fraction (1 - decay) of the gap each round.
    If the median distance is 0 (most updates equal the aggregate), any positive distance is
    outlying. ``old`` is not modified; a new dict is returned.
    """
    try:
        dc = float(decay)
        pr = float(prior)
    except (TypeError, ValueError):
        raise AggregationError("decay and prior must be numbers in [0, 1]") from None
    if not 0.0 <= dc <= 1.0:
        raise AggregationError(f"decay must be in [0, 1]; got {decay}")
    if not 0.0 <= pr <= 1.0:
        raise AggregationError(f"prior must be in [0, 1]; got {prior}")
    for i, r in old.items():
        if not 0.0 <= float(r) <= 1.0:
            raise AggregationError(f"reputation of client {i} must be in [0, 1]; got {r}")
    dist = {i: float(x) for i, x in distances.items()}
    finite = [x for x in dist.values() if math.isfinite(x)]
    med = float(np.median(finite)) if finite else math.inf
    new = {i: float(r) for i, r in old.items()}
    for i in set(dist) | set(rejected):
        x = dist.get(i)
        outlying = x is not None and (not math.isfinite(x) or x > 3.0 * med)
        target = 0.0 if (i in rejected or outlying) else 1.0
        prev = new.get(i, pr)
        new[i] = min(1.0, max(0.0, dc * prev + (1.0 - dc) * target))
    return new
