"""Tests for flow_nexus_server.service.prediction: combine rules against hand computations and
invariants, classification_report against sklearn, shard_indices coverage."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from flow_nexus_server.service.prediction import (
    METHODS,
    PredictionError,
    classification_report,
    combine,
    shard_indices,
)

# Three nodes, two examples, three classes.
A = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
B = np.array([[0.1, 0.7, 0.2], [0.1, 0.3, 0.6]])
C = np.array([[0.5, 0.4, 0.1], [0.3, 0.45, 0.25]])
NODES = [A, B, C]


def test_module_does_not_import_torch() -> None:
    # The server process stays free of torch for this module (checked in a fresh interpreter).
    import subprocess

    code = ("import sys, flow_nexus_server.service.prediction; "
            "sys.exit(1 if 'torch' in sys.modules or 'mcp' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_mean_by_hand() -> None:
    r = combine(NODES, "mean")
    dist = np.array([[1.2, 1.4, 0.4], [0.6, 1.25, 1.15]]) / 3
    np.testing.assert_allclose(r.distribution, dist)
    assert r.predictions.tolist() == [1, 1]
    np.testing.assert_allclose(r.confidence, [1.4 / 3, 1.25 / 3])
    # votes: ex1 A->0, B->1, C->0 ; ex2 A->1, B->2, C->1
    assert r.node_votes.tolist() == [[0, 1, 0], [1, 2, 1]]
    np.testing.assert_allclose(r.agreement, [1 / 3, 2 / 3])
    np.testing.assert_allclose(r.node_confidences, [[0.6, 0.7, 0.5], [0.5, 0.6, 0.45]])
    assert "nodes" not in r.examples()[0]


def test_majority_by_hand() -> None:
    r = combine(NODES, "majority")
    # ex1 votes 0,1,0 -> class 0 with 2/3; ex2 votes 1,2,1 -> class 1 with 2/3.
    assert r.predictions.tolist() == [0, 1]
    np.testing.assert_allclose(r.distribution, [[2 / 3, 1 / 3, 0], [0, 2 / 3, 1 / 3]])
    np.testing.assert_allclose(r.confidence, [2 / 3, 2 / 3])
    np.testing.assert_allclose(r.agreement, [2 / 3, 2 / 3])
    # Mean would pick class 1 for example 1: the rules really differ.
    assert combine(NODES, "mean").predictions[0] == 1


def test_majority_tie_broken_by_summed_probability() -> None:
    # Two nodes vote 0 and 2: a tie; class 2 has the larger summed probability (0.45+0.5 vs 0.55+0.05).
    p1 = np.array([[0.55, 0.0, 0.45]])
    p2 = np.array([[0.05, 0.45, 0.5]])
    r = combine([p1, p2], "majority")
    assert r.predictions.tolist() == [2]
    np.testing.assert_allclose(r.confidence, [0.5])
    np.testing.assert_allclose(r.agreement, [0.5])
    # Reversed sums (0.95 vs 0.85) -> class 0.
    r = combine([np.array([[0.6, 0.0, 0.4]]), np.array([[0.35, 0.2, 0.45]])], "majority")
    assert r.predictions.tolist() == [0]


def test_weighted_by_hand() -> None:
    r = combine(NODES, "weighted")
    # ex1: class0 gets 0.6 + 0.5 = 1.1, class1 gets 0.7 -> 0 ; ex2: class1 0.5 + 0.45, class2 0.6.
    np.testing.assert_allclose(r.distribution, [[1.1 / 1.8, 0.7 / 1.8, 0], [0, 0.95 / 1.55, 0.6 / 1.55]])
    assert r.predictions.tolist() == [0, 1]
    np.testing.assert_allclose(r.confidence, [1.1 / 1.8, 0.95 / 1.55])
    # A single very confident node beats two unsure ones.
    sure = np.array([[0.0, 0.98, 0.02]])
    unsure = np.array([[0.4, 0.3, 0.3]])
    r = combine([sure, unsure, unsure], "weighted")
    assert r.predictions.tolist() == [1]
    np.testing.assert_allclose(r.confidence, [0.98 / 1.78])
    assert combine([sure, unsure, unsure], "majority").predictions.tolist() == [0]


def test_ensemble_reports_every_node() -> None:
    r = combine(NODES, "ensemble")
    np.testing.assert_allclose(r.distribution, combine(NODES, "mean").distribution)
    ex = r.examples(label_names=["a", "b", "c"], node_ids=["n0", "n1", "n2"])
    assert ex[0]["label"] == "b" and ex[0]["prediction"] == 1
    assert ex[0]["nodes"] == [
        {"node_id": "n0", "prediction": 0, "confidence": pytest.approx(0.6), "label": "a"},
        {"node_id": "n1", "prediction": 1, "confidence": pytest.approx(0.7), "label": "b"},
        {"node_id": "n2", "prediction": 0, "confidence": pytest.approx(0.5), "label": "a"},
    ]
    assert ex[1]["agreement"] == pytest.approx(2 / 3)
    assert sum(ex[1]["distribution"]) == pytest.approx(1.0)


def test_node_weights() -> None:
    r = combine([A, B], "mean", node_weights=[3, 1])
    np.testing.assert_allclose(r.distribution, (3 * A + B) / 4)
    # Weighted majority: node B alone outweighs A on example 1 (votes 0 vs 1).
    r = combine([A, B], "majority", node_weights=[1, 2])
    assert r.predictions.tolist() == [1, 2]
    np.testing.assert_allclose(r.confidence, [2 / 3, 2 / 3])
    np.testing.assert_allclose(r.agreement, [0.5, 0.5])  # agreement counts nodes equally
    with pytest.raises(PredictionError, match="2 node weights for 3 nodes"):
        combine(NODES, "mean", node_weights=[1, 1])
    with pytest.raises(PredictionError, match="sum to 0"):
        combine(NODES, "mean", node_weights=[0, 0, 0])
    with pytest.raises(PredictionError, match="non-negative"):
        combine(NODES, "mean", node_weights=[1, -1, 1])


def test_combine_errors() -> None:
    with pytest.raises(PredictionError, match="unknown aggregation 'median'"):
        combine(NODES, "median")  # type: ignore[arg-type]
    with pytest.raises(PredictionError, match="unknown aggregation None"):
        combine(NODES, None)  # type: ignore[arg-type]
    with pytest.raises(PredictionError, match="at least one node"):
        combine([], "mean")
    with pytest.raises(PredictionError, match=r"node 1 answered shape \(1, 3\)"):
        combine([A, A[:1]], "mean")
    with pytest.raises(PredictionError, match="not 1; nodes must send softmax probabilities"):
        combine([A, np.array([[2.0, 1.0, 0.5], [0.1, 0.2, 0.7]])], "mean")
    with pytest.raises(PredictionError, match="NaN"):
        combine([np.array([[np.nan, 1.0]])], "mean")
    with pytest.raises(PredictionError, match="negative"):
        combine([np.array([[-0.5, 1.5]])], "mean")


def test_single_example_and_single_node() -> None:
    r = combine([np.array([0.2, 0.8])], "majority")
    assert r.predictions.tolist() == [1]
    assert r.agreement.tolist() == [1.0]
    assert r.confidence.tolist() == [1.0]


# --------------------------------------------------------------------------- hypothesis


@st.composite
def node_answers(draw, max_nodes: int = 6, max_n: int = 8, max_c: int = 5):
    k = draw(st.integers(1, max_nodes))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, max_c))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        raw = rng.random((k, n, c)) + 1e-3
    else:  # coarse values: many exact ties
        raw = rng.integers(1, 4, size=(k, n, c)).astype(np.float64)
    return list(raw / raw.sum(axis=2, keepdims=True))


@settings(max_examples=150, deadline=None)
@given(node_answers(), st.sampled_from(METHODS))
def test_invariants(per_node, method) -> None:
    r = combine(per_node, method)
    n = per_node[0].shape[0]
    k = len(per_node)
    assert r.distribution.shape == per_node[0].shape
    np.testing.assert_allclose(r.distribution.sum(axis=1), 1.0, atol=1e-9)
    assert (r.distribution >= 0).all()
    np.testing.assert_allclose(r.confidence, r.distribution[np.arange(n), r.predictions])
    # The winner has the largest combined value.
    assert (r.confidence >= r.distribution.max(axis=1) - 1e-12).all()
    assert ((r.agreement >= 0) & (r.agreement <= 1)).all()
    expected_agreement = (np.stack([p.argmax(axis=1) for p in per_node], axis=1)
                          == r.predictions[:, None]).sum(axis=1) / k
    np.testing.assert_allclose(r.agreement, expected_agreement)
    # The node order does not matter (ties are compared up to rounding).
    assert (combine(per_node[::-1], method).predictions == r.predictions).all()


@settings(max_examples=150, deadline=None)
@given(node_answers())
def test_mean_sums_to_one_and_matches_numpy(per_node) -> None:
    r = combine(per_node, "mean")
    np.testing.assert_allclose(r.distribution, np.mean(per_node, axis=0))
    np.testing.assert_allclose(r.distribution.sum(axis=1), 1.0, atol=1e-12)
    mean = np.mean(per_node, axis=0)
    top = mean.max(axis=1)
    # The winner is the first class whose mean equals the maximum up to rounding, so the
    # answer does not depend on the order in which node answers were summed.
    first = (mean >= top[:, None] - 1e-12).argmax(axis=1)
    assert (r.predictions == first).all()
    shuffled = combine(per_node[::-1], "mean")
    assert (shuffled.predictions == r.predictions).all()


@settings(max_examples=150, deadline=None)
@given(node_answers())
def test_majority_is_argmax_of_vote_counts(per_node) -> None:
    r = combine(per_node, "majority")
    c = per_node[0].shape[1]
    votes = np.stack([p.argmax(axis=1) for p in per_node], axis=1)
    counts = np.stack([np.bincount(v, minlength=c) for v in votes])
    top = counts.max(axis=1)
    assert (counts[np.arange(len(votes)), r.predictions] == top).all()
    np.testing.assert_allclose(r.distribution, counts / len(per_node))
    unique = (counts == top[:, None]).sum(axis=1) == 1
    assert (r.predictions[unique] == counts[unique].argmax(axis=1)).all()


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 7), st.integers(1, 8), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_weighted_equal_confidences_equals_majority(k, n, c, seed) -> None:
    # Every node's top probability is the same 0.7: weighted voting reduces to counting.
    rng = np.random.default_rng(seed)
    per_node = []
    for _ in range(k):
        p = np.full((n, c), 0.3 / (c - 1))
        p[np.arange(n), rng.integers(0, c, n)] = 0.7
        per_node.append(p)
    w = combine(per_node, "weighted")
    m = combine(per_node, "majority")
    votes = np.stack([p.argmax(axis=1) for p in per_node], axis=1)
    counts = np.stack([np.bincount(v, minlength=c) for v in votes])
    not_tied = (counts == counts.max(axis=1, keepdims=True)).sum(axis=1) == 1
    assert (w.predictions[not_tied] == m.predictions[not_tied]).all()
    np.testing.assert_allclose(w.distribution, m.distribution)


# --------------------------------------------------------------------------- report


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_classification_report_matches_sklearn(n, k, seed) -> None:
    rng = np.random.default_rng(seed)
    # Draw from a random subset of the classes so that some have no support / no predictions.
    t = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.5, t, rng.integers(0, max(1, k - 1), n))
    names = [f"c{i}" for i in range(k)]
    rep = classification_report(t.tolist(), p, names)
    prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="macro", zero_division=0)
    assert rep["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert rep["macro_precision"] == pytest.approx(prec)
    assert rep["macro_recall"] == pytest.approx(rec)
    assert rep["macro_f1"] == pytest.approx(f1)
    assert rep["confusion_matrix"] == confusion_matrix(t, p, labels=list(range(k))).tolist()
    assert rep["label_names"] == names
    assert rep["support"] == n


def test_classification_report_by_hand_and_names() -> None:
    names = ["negative", "neutral", "positive"]
    rep = classification_report(["negative", "positive", "positive", "negative"],
                                [0, 2, 0, 0], names)
    assert rep["accuracy"] == 0.75
    # neutral has no support and no predictions: out of the macro mean.
    assert rep["macro_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert rep["macro_recall"] == pytest.approx((1 + 0.5) / 2)
    assert rep["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert rep["confusion_matrix"] == [[2, 0, 0], [0, 0, 0], [1, 0, 1]]
    assert rep["per_class"][1] == {"label": "neutral", "precision": 0.0, "recall": 0.0,
                                   "f1": 0.0, "support": 0, "predicted": 0}
    # Without names: indices up to the largest label.
    assert classification_report([0, 3], [0, 3])["label_names"] == ["0", "1", "2", "3"]
    with pytest.raises(PredictionError, match="2 true labels but 1 predictions"):
        classification_report([0, 1], [0], names)
    with pytest.raises(PredictionError, match="not a known label"):
        classification_report(["happy"], [0], names)
    with pytest.raises(PredictionError, match="not a class index 0-2"):
        classification_report([3], [0], names)
    with pytest.raises(PredictionError, match="no examples"):
        classification_report([], [], names)


# --------------------------------------------------------------------------- shards


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.integers(1, 40))
def test_shard_indices_cover_exactly_once(n, k) -> None:
    shards = shard_indices(n, k)
    assert len(shards) == k
    covered = [i for s in shards for i in range(n)[s]]
    assert covered == list(range(n))  # in order, each once
    sizes = [len(range(n)[s]) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(s.step is None for s in shards)


def test_shard_indices_examples_and_errors() -> None:
    assert shard_indices(10, 3) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert shard_indices(2, 4) == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]
    with pytest.raises(PredictionError, match="at least one"):
        shard_indices(5, 0)
    with pytest.raises(PredictionError, match="cannot shard -1"):
        shard_indices(-1, 2)
