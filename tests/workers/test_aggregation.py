"""Tests for workers.aggregation against the textbook formulae (the module docstring lists them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from workers.aggregation import (
    RULES,
    AggregationError,
    aggregate,
    coordinate_median,
    fedavg,
    krum,
    krum_scores,
    multi_krum,
    reputation_update,
    trimmed_mean,
)

FAST = settings(max_examples=60, deadline=None)


@st.composite
def stacks(draw, n_min=3, n_max=12, d_min=1, d_max=50):
    """Random (n, d) float64 stacks from a seeded generator, plus positive weights."""
    n = draw(st.integers(n_min, n_max))
    d = draw(st.integers(d_min, d_max))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    w = rng.normal(loc=rng.normal(size=d), scale=scale, size=(n, d))
    weights = rng.uniform(0.1, 100.0, size=n)
    return w, weights


# Arbitrary bounded floats, ties and duplicates included.
raw_stacks = st.tuples(st.integers(3, 12), st.integers(1, 50)).flatmap(
    lambda nd: hnp.arrays(
        np.float64, nd, elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)
    )
)


def naive_krum_scores(w: np.ndarray, f: int) -> np.ndarray:
    n = len(w)
    k = max(1, n - f - 2)
    scores = np.empty(n)
    for i in range(n):
        dists = []
        for j in range(n):
            if j != i:
                diff = w[i] - w[j]
                dists.append(float(np.dot(diff, diff)))
        scores[i] = sum(sorted(dists)[:k])
    return scores


# --------------------------------------------------------------------------- formulae


@FAST
@given(stacks())
def test_fedavg_is_weighted_mean(data):
    w, m = data
    expected = (m[:, None] * w).sum(axis=0) / m.sum()
    np.testing.assert_allclose(fedavg(w, m), expected, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(fedavg(w), w.mean(axis=0), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(fedavg(w, list(m)), expected, rtol=1e-10, atol=1e-9)


@FAST
@given(raw_stacks)
def test_median_equals_numpy(w):
    np.testing.assert_array_equal(coordinate_median(w), np.median(w, axis=0))


@FAST
@given(raw_stacks, st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49]))
def test_trimmed_mean_is_sort_and_slice(w, beta):
    n = len(w)
    k = int(beta * n)
    expected = np.sort(w, axis=0)[k : n - k].mean(axis=0)
    got = trimmed_mean(w, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got, stats.trim_mean(w, beta, axis=0), rtol=1e-12, atol=1e-9)


@FAST
@given(stacks(n_min=4, n_max=4))
def test_trimmed_mean_quarter_of_four_is_median(data):
    w, _ = data
    np.testing.assert_allclose(trimmed_mean(w, 0.25), np.median(w, axis=0), rtol=1e-12)


@FAST
@given(stacks(), st.integers(0, 9))
def test_krum_matches_naive_double_loop(data, f):
    w, _ = data
    n = len(w)
    f = min(f, n - 3)
    naive = naive_krum_scores(w, f)
    scores = krum_scores(w, f)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, naive, rtol=1e-7, atol=1e-9 * naive.max())
    chosen = krum(w, f)
    idx = [i for i in range(n) if np.array_equal(w[i], chosen)]
    assert idx, "krum must return one of the updates"
    assert naive[idx[0]] <= naive.min() * (1 + 1e-9) + 1e-12


@FAST
@given(raw_stacks)
def test_krum_with_ties_picks_a_minimal_score(w):
    n = len(w)
    naive = naive_krum_scores(w, 1 if n > 3 else 0)
    chosen = krum(w, 1 if n > 3 else 0)
    best = min(naive[i] for i in range(n) if np.array_equal(w[i], chosen))
    assert best <= naive.min() + 1e-6 * max(1.0, naive.max())


@FAST
@given(stacks(), st.integers(0, 9))
def test_multi_krum_m1_is_krum_and_m_n_is_fedavg(data, f):
    w, m = data
    n = len(w)
    f = min(f, n - 3)
    np.testing.assert_array_equal(multi_krum(w, f, 1, m), krum(w, f))
    np.testing.assert_allclose(multi_krum(w, 0, n, m), fedavg(w, m), rtol=1e-10, atol=1e-9)
    # The m best are averaged with their weights.
    k = max(1, n // 2)
    sel = np.argsort(naive_krum_scores(w, f), kind="stable")[:k]
    expected = (m[sel, None] * w[sel]).sum(0) / m[sel].sum()
    np.testing.assert_allclose(multi_krum(w, f, k, m), expected, rtol=1e-9, atol=1e-9)


def test_float64_distances_survive_near_identical_float32_updates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=1000).astype(np.float32) * 1000
    w = np.stack([base + np.float32(1e-3) * rng.normal(size=1000).astype(np.float32) for _ in range(6)])
    w = w.astype(np.float32)
    scores = krum_scores(w, 1)
    naive = naive_krum_scores(w.astype(np.float64), 1)
    np.testing.assert_allclose(scores, naive, rtol=1e-6)
    assert krum(w, 1).dtype == np.float32
    assert fedavg(w).dtype == np.float32


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("seed", range(5))
def test_one_huge_outlier(seed):
    rng = np.random.default_rng(seed)
    n, d = 10, 50
    center = rng.normal(size=d)
    honest = center + 0.1 * rng.normal(size=(n - 1, d))
    bad = center + 50.0 * rng.normal(size=(1, d))
    w = np.concatenate([bad, honest])
    honest_mean = honest.mean(axis=0)

    def gap(x):
        return float(np.linalg.norm(x - honest_mean))

    assert gap(fedavg(w)) > 10.0
    assert gap(krum(w, 1)) < 1.5
    assert gap(multi_krum(w, 1, n - 1)) < 0.2
    assert gap(coordinate_median(w)) < 0.5
    assert gap(trimmed_mean(w, 0.2)) < 0.5
    agg, info = aggregate("krum", w, f=1)
    assert info["selected"] != [0] and 0 in info["rejected"]
    assert info["distances_to_aggregate"][0] > 100 * np.median(info["distances_to_aggregate"])


def test_non_finite_policy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(7, 20))
    w[2] = np.nan
    w[5, 3] = np.inf
    with pytest.raises(AggregationError, match=r"\[2, 5\]"):
        fedavg(w)
    with pytest.raises(AggregationError, match=r"\[2, 5\]"):
        aggregate("fedavg", w)
    # Krum never selects a non-finite update, and scores them +inf.
    scores = krum_scores(w, 1)
    assert np.isinf(scores[[2, 5]]).all() and np.isfinite(np.delete(scores, [2, 5])).all()
    assert np.isfinite(krum(w, 1)).all()
    _, info = aggregate("multi_krum", w, f=1, m=5)
    assert set(info["selected"]).isdisjoint({2, 5}) and len(info["selected"]) == 5
    assert info["nonfinite"] == [2, 5]
    assert math.isinf(info["distances_to_aggregate"][2])
    with pytest.raises(AggregationError, match=r"only 5 of 7"):
        multi_krum(w, 1, 6)
    # Median / trimmed mean: non-finite entries are missing values per coordinate.
    masked = np.where(np.isfinite(w), w, np.nan)
    np.testing.assert_allclose(coordinate_median(w), np.nanmedian(masked, axis=0))
    got = trimmed_mean(w, 0.2)
    for c in range(w.shape[1]):
        col = np.sort(masked[:, c][~np.isnan(masked[:, c])])
        k = int(0.2 * len(col))
        assert got[c] == pytest.approx(col[k : len(col) - k].mean(), rel=1e-12)
    all_bad = np.full((3, 2), np.nan)
    all_bad[:, 1] = 1.0
    with pytest.raises(AggregationError, match="coordinate 0"):
        coordinate_median(all_bad)


# --------------------------------------------------------------------------- aggregate()


def test_aggregate_dispatch_and_info():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 8)).astype(np.float32)
    m = [1, 2, 3, 4, 5, 6]
    assert set(RULES) == {"fedavg", "median", "trimmed_mean", "krum", "multi_krum"}
    for rule in RULES:
        agg, info = aggregate(rule, w, m, f=1, beta=0.2)
        assert agg.shape == (8,) and agg.dtype == np.float32
        assert info["rule"] == rule and info["n"] == 6 and info["d"] == 8
        dists = info["distances_to_aggregate"]
        assert len(dists) == 6 and all(isinstance(x, float) for x in dists)
        np.testing.assert_allclose(
            dists, np.linalg.norm(w.astype(np.float64) - agg.astype(np.float64), axis=1), rtol=1e-5
        )
    np.testing.assert_allclose(aggregate("fedavg", w, m)[0], fedavg(w, m))
    np.testing.assert_array_equal(aggregate("median", w)[0], coordinate_median(w))
    np.testing.assert_array_equal(aggregate("trimmed_mean", w, beta=0.3)[0], trimmed_mean(w, 0.3))
    agg, info = aggregate("krum", w, f=1)
    np.testing.assert_array_equal(agg, krum(w, 1))
    assert len(info["selected"]) == 1 and len(info["rejected"]) == 5
    assert info["distances_to_aggregate"][info["selected"][0]] == 0.0
    agg, info = aggregate("multi_krum", w, m, f=1)  # m defaults to n - f
    assert info["m"] == 5 and len(info["selected"]) == 5
    np.testing.assert_allclose(agg, multi_krum(w, 1, 5, m))
    assert info["krum_assumption_met"] is True  # n=6 >= 2f + 3 = 5
    _, info = aggregate("krum", w, f=2)
    assert info["krum_assumption_met"] is False  # n=6 < 2f + 3 = 7


def test_inputs_are_not_mutated_and_lists_accepted():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 4))
    w[1, 0] = np.nan
    before = w.copy()
    for rule in ("median", "trimmed_mean", "krum", "multi_krum"):
        aggregate(rule, w, f=1)
    np.testing.assert_array_equal(w, before)
    as_list = [row for row in rng.normal(size=(5, 4))]
    np.testing.assert_allclose(fedavg(as_list), np.mean(as_list, axis=0))
    np.testing.assert_allclose(fedavg(torch.tensor(np.array(as_list))), np.mean(as_list, axis=0))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: fedavg([]), r"n=0"),
        (lambda: fedavg(np.zeros((0, 3))), r"n=0"),
        (lambda: fedavg(np.zeros((3, 0))), r"n=3, d=0"),
        (lambda: fedavg([np.zeros(4), np.zeros(4), np.zeros(3)]), r"update 0 has 4 .* update 2 has 3"),
        (lambda: fedavg(np.zeros(5)), r"shape \(5,\)"),
        (lambda: fedavg(np.zeros((3, 2)), [1, 2]), r"2 weights for 3 updates"),
        (lambda: fedavg(np.zeros((3, 2)), [1, -2, 1]), r"weight\[1\] = -2"),
        (lambda: fedavg(np.zeros((3, 2)), [0, 0, 0]), r"all 3 weights are 0"),
        (lambda: fedavg(np.zeros((3, 2)), [1, np.nan, 1]), r"weight\[1\] = nan"),
        (lambda: trimmed_mean(np.zeros((3, 2)), 0.5), r"\[0, 0.5\); got 0.5"),
        (lambda: trimmed_mean(np.zeros((3, 2)), -0.1), r"got -0.1"),
        (lambda: krum(np.zeros((4, 2)), 2), r"n=4 with f=2 .*at least 5"),
        (lambda: krum_scores(np.zeros((3, 2)), 1), r"n=3 with f=1 .*at least 4"),
        (lambda: krum(np.zeros((5, 2)), -1), r"got -1"),
        (lambda: multi_krum(np.zeros((5, 2)), 1, 6), r"n=5\]; got 6"),
        (lambda: multi_krum(np.zeros((5, 2)), 1, 0), r"got 0"),
        (lambda: multi_krum(np.arange(10.0).reshape(5, 2), 0, 1, [0, 0, 1, 0, 0]), r"weight 0"),
        (lambda: aggregate("bulyan", np.zeros((5, 2))), r"bulyan"),
        (lambda: aggregate("krum", np.zeros((3, 2))), r"n=3 with f=1"),
    ],
)
def test_errors_name_the_numbers(call, pattern):
    with pytest.raises(AggregationError, match=pattern):
        call()
    assert issubclass(AggregationError, ValueError)


# --------------------------------------------------------------------------- reputation


def test_reputation_formula():
    old = {0: 0.5, 1: 0.5, 2: 0.5, 9: 0.3}
    dists = {0: 1.0, 1: 1.2, 2: 10.0, 3: 0.9}
    new = reputation_update(old, dists, rejected={1}, decay=0.9)
    assert new[0] == pytest.approx(0.9 * 0.5 + 0.1)  # accepted: toward 1
    assert new[1] == pytest.approx(0.9 * 0.5)  # rejected: toward 0
    assert new[2] == pytest.approx(0.9 * 0.5)  # 10 > 3 * median(1.0, 1.2, 10, 0.9) = 3.3
    assert new[3] == pytest.approx(0.9 * 1.0 + 0.1)  # newcomer starts at prior 1.0
    assert new[9] == 0.3  # absent this round: unchanged
    assert old == {0: 0.5, 1: 0.5, 2: 0.5, 9: 0.3}
    assert reputation_update({}, {0: math.inf, 1: 1.0, 2: 1.0}, set())[0] == pytest.approx(0.9)
    with pytest.raises(AggregationError, match="got 1.5"):
        reputation_update({}, {}, set(), decay=1.5)
    with pytest.raises(AggregationError, match=r"client 4 .* got 2"):
        reputation_update({4: 2}, {}, set())


@FAST
@given(
    st.dictionaries(st.integers(0, 20), st.floats(0, 1), max_size=10),
    st.dictionaries(st.integers(0, 20), st.floats(0, 1e6) | st.just(math.inf), max_size=10),
    st.sets(st.integers(0, 20), max_size=5),
    st.floats(0, 1),
)
def test_reputation_stays_in_unit_interval(old, dists, rejected, decay):
    new = reputation_update(old, dists, rejected, decay)
    assert all(0.0 <= r <= 1.0 for r in new.values())
    assert set(new) == set(old) | set(dists) | rejected
    for i in rejected:
        assert new[i] <= old.get(i, 1.0) + 1e-12
