"""Tests for workers.inference: input forms and their errors, predictions of briefly trained
real models (digits mlp, tweet-polarity transformer), int8 quantization, latency/throughput."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.data import Tokenizer, load_dataset, train_val_split
from workers.inference import (
    InferenceError,
    latency_profile,
    model_size_bytes,
    parse_inputs,
    predict_proba,
    quantize_dynamic_int8,
    throughput,
)
from workers.models import SUPPORTED, TaskInfo, build_model

torch.set_num_threads(1)
log = logging.getLogger(__name__)

VEC = TaskInfo("vectors", (64,), 10)
IMG = TaskInfo("images", (1, 4, 3), 3)
IMG3 = TaskInfo("images", (3, 2, 2), 2)
TXT = TaskInfo("text", (), 2, vocab_size=50, max_len=8)
LM = TaskInfo("lm", (), 50, vocab_size=50, max_len=8)
POLARITY = ["negative", "positive"]


@dataclass
class Trained:
    """Stand-in for workers.training.TrainedModel (same attribute names)."""

    model: nn.Module
    task: TaskInfo
    tokenizer: Tokenizer | None
    label_names: list[str]
    architecture: str
    preset: str
    max_len: int
    local_model: nn.Module | None = None


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
         batch: int = 32, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            b = perm[s:s + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    tr, te = train_val_split(len(ds), 0.2, seed=0, stratify=ds.y)
    torch.manual_seed(0)
    task = TaskInfo("vectors", ds.input_shape, ds.num_classes)
    model = build_model("mlp", "base", task)
    _fit(model, torch.from_numpy(ds.X[tr]), torch.from_numpy(ds.y[tr]), epochs=15, lr=2e-3)
    trained = Trained(model, task, None, ds.label_names, "mlp", "base", 0)
    return trained, ds.X[te], ds.y[te]


@pytest.fixture(scope="module")
def tweets():
    ds = load_dataset("tweet-polarity")
    perm = np.random.default_rng(0).permutation(len(ds))
    tr, te = perm[:3000], perm[-200:]
    texts = [ds.X[i] for i in tr]
    tok = Tokenizer.fit(texts, vocab_size=8000, min_freq=2)
    max_len = 40
    task = TaskInfo("text", (), 2, vocab_size=tok.vocab_size, max_len=max_len)
    torch.manual_seed(0)
    model = build_model("transformer", "base", task)
    _fit(model, torch.from_numpy(tok.encode(texts, max_len)), torch.from_numpy(ds.y[tr]),
         epochs=1, lr=2e-3)
    trained = Trained(model, task, tok, ds.label_names, "transformer", "base", max_len)
    return trained, [ds.X[i] for i in te], ds.y[te]


# --------------------------------------------------------------------------- parse_inputs


def test_parse_vectors_forms() -> None:
    one = [0.5] * 64
    x, y = parse_inputs(one, VEC)
    assert x.shape == (1, 64) and x.dtype == np.float32 and y is None
    x, _ = parse_inputs([one, one, one], VEC)
    assert x.shape == (3, 64)
    x, _ = parse_inputs(np.zeros((2, 64)), VEC)
    assert x.shape == (2, 64)
    x, _ = parse_inputs(json.dumps([one, one]), VEC)  # the tool's input_data is a JSON string
    assert x.shape == (2, 64)
    names = [str(i) for i in range(10)]
    for key, lkey in (("inputs", "labels"), ("data", "y"), ("X", "targets"), ("features", "labels")):
        x, y = parse_inputs({key: [one, one], lkey: [3, "7"]}, VEC, names)
        assert x.shape == (2, 64) and y == [3, 7]
    x, y = parse_inputs({"X": one, "y": 4}, VEC, names)  # one example, one scalar label
    assert x.shape == (1, 64) and y == [4]
    # A one-feature model reads a flat list as several examples.
    x, _ = parse_inputs([1, 2, 3], TaskInfo("vectors", (1,), 2))
    assert x.shape == (3, 1)


def test_parse_images_forms() -> None:
    chw = np.arange(12, dtype=float).reshape(1, 4, 3)
    expected = chw.reshape(1, 1, 4, 3)
    for form in (chw.tolist(), chw[0].tolist(), chw.reshape(-1).tolist()):
        x, _ = parse_inputs(form, IMG)
        assert x.shape == (1, 1, 4, 3)
        np.testing.assert_array_equal(x, expected)
    for batch in (np.stack([chw] * 2).tolist(), np.stack([chw[0]] * 2).tolist(),
                  np.stack([chw.reshape(-1)] * 2).tolist()):
        x, _ = parse_inputs(batch, IMG)
        assert x.shape == (2, 1, 4, 3)
    # Three channels: (C,H,W) is one example, flat values too, (n,C,H,W) a batch.
    img = np.ones((3, 2, 2))
    assert parse_inputs(img.tolist(), IMG3)[0].shape == (1, 3, 2, 2)
    assert parse_inputs(img.reshape(-1).tolist(), IMG3)[0].shape == (1, 3, 2, 2)
    assert parse_inputs([img.tolist()] * 4, IMG3)[0].shape == (4, 3, 2, 2)
    x, y = parse_inputs({"inputs": [img.tolist()] * 2, "labels": [0, 1]}, IMG3)
    assert x.shape == (2, 3, 2, 2) and y == [0, 1]


def test_parse_text_forms() -> None:
    assert parse_inputs("what a day", TXT) == (["what a day"], None)
    assert parse_inputs(["a", "b"], TXT) == (["a", "b"], None)
    assert parse_inputs('["a", "b"]', TXT) == (["a", "b"], None)
    # A string that merely looks like JSON stays text.
    assert parse_inputs("[not json", TXT) == (["[not json"], None)
    x, y = parse_inputs({"texts": ["good", "bad"], "labels": ["Positive", "negative"]}, TXT, POLARITY)
    assert x == ["good", "bad"] and y == [1, 0]
    x, y = parse_inputs({"text": "fine", "y": "positive"}, TXT, POLARITY)
    assert x == ["fine"] and y == [1]
    x, y = parse_inputs(json.dumps({"inputs": ["ok"], "targets": [0]}), TXT, POLARITY)
    assert x == ["ok"] and y == [0]
    assert parse_inputs(["some text"], LM) == (["some text"], None)


@pytest.mark.parametrize("payload, task, message", [
    ([[0.0] * 64, [0.0] * 64, [0.0] * 10], VEC, "example 3 has 10 features, the model takes 64"),
    ([[0.0] * 10, [0.0] * 10], VEC, "example 1 has 10 features, the model takes 64"),
    ([0.0] * 10, VEC, "the input has 10 features, the model takes 64"),
    ([], VEC, "no examples: the input is empty"),
    ([], TXT, "no examples: the input is empty"),
    ({"inputs": []}, VEC, "no examples"),
    ("", VEC, "no examples"),
    ("  ", TXT, "no examples: the input is empty"),
    (None, VEC, "no examples: the input is null"),
    ([[0.0] * 64, [0.0] * 64 + ["x"]], VEC, r"example 2 holds text \('x'\) at position \[64\]"),
    ([[0.0] * 64, None], VEC, "example 2 is null, not a feature vector"),
    ([[0.0] * 64, [[1.0]] * 64], VEC, "example 2 is nested 2 levels deep"),
    ([[0.0] * 64, [float("nan")] * 64], VEC, "example 2 holds NaN"),
    ([True] * 64, VEC, r"holds a boolean \(true\)"),
    ("hello", VEC, "a vectors model takes feature vectors"),
    (5, VEC, "single number"),
    ([1, 2, 3], TXT, r"example 1 is a number \(1\); a text model takes strings"),
    (["ok", {"t": 1}], TXT, "example 2 is an object; a text model takes strings"),
    (42, TXT, "a text model takes a string or a list of strings"),
    ({"foo": [1]}, VEC, "holds no examples; put them under one of 'inputs'"),
    ({"inputs": ["a"], "text": ["b"]}, TXT, "several example keys"),
    ({"inputs": {"a": 1}}, TXT, "'inputs' holds an object"),
    (np.ones((2, 3, 3)).tolist(), IMG, r"example 1 has shape \(3, 3\), the model takes \(1, 4, 3\)"),
    ([np.ones((4, 3)).tolist(), np.ones((3, 3)).tolist()], IMG, r"example 2 has shape \(3, 3\)"),
    ([1.0] * 11, IMG, "the input has 11 values, the model takes"),
    (np.ones((2, 2, 2)).tolist(), IMG3, r"the input has shape \(2, 2, 2\)"),
])
def test_parse_errors(payload, task, message) -> None:
    with pytest.raises(InferenceError, match=message):
        parse_inputs(payload, task)


def test_label_errors() -> None:
    with pytest.raises(InferenceError, match="label of example 2 is 'neutral', an unknown label; "
                                             "the model's labels are negative, positive"):
        parse_inputs({"texts": ["a", "b"], "labels": ["positive", "neutral"]}, TXT, POLARITY)
    with pytest.raises(InferenceError, match="3 labels for 2 examples"):
        parse_inputs({"texts": ["a", "b"], "labels": [0, 1, 1]}, TXT, POLARITY)
    with pytest.raises(InferenceError, match=r"label of example 1 is 12, but the model has 10 classes \(indices 0-9\)"):
        parse_inputs({"X": [0.0] * 64, "y": [12]}, VEC)
    with pytest.raises(InferenceError, match="label of example 1 is a boolean"):
        parse_inputs({"X": [0.0] * 64, "y": [True]}, VEC)
    with pytest.raises(InferenceError, match="takes no labels"):
        parse_inputs({"text": "x", "labels": [1]}, LM)
    with pytest.raises(InferenceError, match="'seven', an unknown label; the model's labels are 0, 1, 2"):
        parse_inputs({"X": [0.0] * 64, "y": ["seven"]}, VEC, [str(i) for i in range(10)])
    assert issubclass(InferenceError, ValueError)


# --------------------------------------------------------------------------- predictions


def test_digits_mlp_predicts_held_out(digits) -> None:
    trained, x, y = digits
    proba = predict_proba(trained, x)
    assert proba.shape == (len(x), 10) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    acc = float((proba.argmax(axis=1) == y).mean())
    log.info("digits mlp held-out accuracy %.4f", acc)
    assert acc > 0.9
    # Batching does not change the answer; list and dict forms give the same probabilities.
    np.testing.assert_allclose(predict_proba(trained, x, batch_size=7), proba, atol=1e-6)
    np.testing.assert_allclose(predict_proba(trained, {"inputs": x[:5].tolist()}), proba[:5], atol=1e-6)


def test_training_mode_restored_and_local_model(digits) -> None:
    trained, x, _ = digits
    trained.model.train()
    try:
        a = predict_proba(trained, x[:20])
        b = predict_proba(trained, x[:20])
        np.testing.assert_array_equal(a, b)  # dropout off while predicting
        assert trained.model.training
    finally:
        trained.model.eval()
    torch.manual_seed(1)
    other = build_model("mlp", "base", trained.task).eval()
    with_local = replace(trained, local_model=other)
    local = predict_proba(with_local, x[:20], local=True)
    with torch.inference_mode():
        expected = torch.softmax(other(torch.from_numpy(x[:20])).double(), -1).numpy()
    np.testing.assert_allclose(local, expected, atol=1e-6)
    np.testing.assert_allclose(predict_proba(with_local, x[:20]), a)
    # No local model: falls back to the global one.
    np.testing.assert_allclose(predict_proba(trained, x[:20], local=True), a)


def test_text_transformer_predicts_polarity(tweets) -> None:
    trained, texts, y = tweets
    pred = predict_proba(trained, {"texts": texts, "labels": [POLARITY[v] for v in y]}).argmax(1)
    acc = float((pred == y).mean())
    log.info("tweet-polarity transformer held-out accuracy %.4f", acc)
    assert acc > 0.8
    assert set(pred) == {0, 1}
    assert (pred[y == 1] == 1).mean() > 0.5  # it finds most positive tweets, not only the majority
    out = predict_proba(trained, ["I love this, thank you so much! awesome service",
                                  "worst flight ever, delayed for hours and they lost my bag"])
    assert [POLARITY[i] for i in out.argmax(1)] == ["positive", "negative"]
    assert out.max(1).min() > 0.7


def test_language_model_is_not_served() -> None:
    tok = Tokenizer(list(Tokenizer.SPECIALS) + [f"w{i}" for i in range(46)])
    trained = Trained(build_model("rnn", "base", LM), LM, tok, [], "rnn", "base", 8)
    with pytest.raises(InferenceError, match="language model.*serves classifiers.*neural_train_distributed"):
        predict_proba(trained, ["w1 w2"])


def test_text_model_without_tokenizer() -> None:
    trained = Trained(build_model("mlp", "base", TXT), TXT, None, POLARITY, "mlp", "base", 8)
    with pytest.raises(InferenceError, match="no tokenizer"):
        predict_proba(trained, "hello")


# --------------------------------------------------------------------------- quantization


def test_quantized_digits_smaller_and_as_accurate(digits) -> None:
    trained, x, y = digits
    q = quantize_dynamic_int8(trained.model)
    size_f, size_q = model_size_bytes(trained.model), model_size_bytes(q)
    acc_f = float((predict_proba(trained, x).argmax(1) == y).mean())
    acc_q = float((predict_proba(trained, x, model=q).argmax(1) == y).mean())
    log.info("digits mlp float %.4f (%d B) int8 %.4f (%d B)", acc_f, size_f, acc_q, size_q)
    assert size_q < 0.5 * size_f
    assert abs(acc_f - acc_q) <= 0.03
    # The original is untouched.
    assert all(type(m) is not nn.Linear or m.weight.dtype == torch.float32 for m in trained.model.modules())
    assert any(type(m) is nn.Linear for m in trained.model.modules())


def test_quantized_text_transformer_agrees(tweets) -> None:
    trained, texts, _ = tweets
    q = quantize_dynamic_int8(trained.model)
    a = predict_proba(trained, texts).argmax(1)
    b = predict_proba(trained, texts, model=q).argmax(1)
    assert (a == b).mean() >= 0.95
    assert model_size_bytes(q) < model_size_bytes(trained.model)


_KIND_TASKS = {"vectors": VEC, "images": IMG3, "text": TXT, "lm": LM}


@pytest.mark.parametrize("arch, kind", [(a, k) for a in ("mlp", "cnn", "rnn", "transformer")
                                        for k in SUPPORTED[a]])
def test_quantize_every_architecture(arch: str, kind: str) -> None:
    task = _KIND_TASKS[kind]
    torch.manual_seed(0)
    model = build_model(arch, "base", task).eval()
    q = quantize_dynamic_int8(model)
    g = torch.Generator().manual_seed(0)
    if kind in ("text", "lm"):
        x = torch.randint(1, task.vocab_size, (4, task.max_len), generator=g)
        if kind == "text":
            x[0, 3:] = 0
    else:
        x = torch.randn(4, *task.input_shape, generator=g)
    with torch.inference_mode():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 0.1
    quantized = [m for m in q.modules() if "quantized" in type(m).__module__]
    size_f, size_q = model_size_bytes(model), model_size_bytes(q)
    if arch == "cnn" and kind == "text":
        # Convolutions and embeddings are not dynamically quantizable and the head is below the
        # size threshold: nothing changes, and nothing grows.
        assert not quantized and size_q <= size_f
    elif arch == "transformer" and kind == "lm":
        # GPT-2's projections are transformers' Conv1D, not nn.Linear, and its head is tied to the
        # token embedding: dynamic int8 leaves the model as it is, and nothing grows.
        assert not quantized and size_q <= size_f
    elif arch == "cnn":
        # The dense layer over the flattened feature maps is quantized; the convolutions stay float.
        assert quantized and size_q < size_f
    else:
        assert quantized and size_q < 0.8 * size_f


def test_quantize_custom_layers() -> None:
    layers = [{"type": "embedding", "embedding_dim": 16}, {"type": "transformer_block", "num_heads": 2},
              {"type": "lstm", "hidden_size": 8}, {"type": "dense", "units": 8}, {"type": "output"}]
    model = build_model("transformer", "custom", TXT, layers=layers).eval()
    q = quantize_dynamic_int8(model)
    x = torch.randint(1, 50, (3, 8))
    with torch.inference_mode():
        assert float((q(x) - model(x)).abs().max()) < 0.1


# --------------------------------------------------------------------------- timing


def test_latency_and_throughput(digits, tweets) -> None:
    trained, x, _ = digits
    prof = latency_profile(trained, x[0].tolist(), runs=30)
    assert 0 < prof["p50_ms"] <= prof["p95_ms"] <= prof["p99_ms"] <= prof["max_ms"]
    assert prof["runs"] == 30 and prof["min_ms"] <= prof["p50_ms"]
    q = quantize_dynamic_int8(trained.model)
    prof_q = latency_profile(trained, x[:3], runs=30, model=q)  # first example of a batch
    assert 0 < prof_q["p50_ms"] <= prof_q["p95_ms"] <= prof_q["p99_ms"]
    sps = throughput(trained, x, seconds=0.2)
    assert sps > 0
    text_model, texts, _ = tweets
    prof_t = latency_profile(text_model, texts[0], runs=30)
    assert 0 < prof_t["p50_ms"] <= prof_t["p95_ms"] <= prof_t["p99_ms"]
    assert throughput(text_model, texts[:64], seconds=0.2) > 0
    log.info("latency p50: mlp %.3f ms (int8 %.3f ms), transformer text %.3f ms; mlp %.0f samples/s",
             prof["p50_ms"], prof_q["p50_ms"], prof_t["p50_ms"], sps)
    with pytest.raises(InferenceError, match="runs must be at least 1"):
        latency_profile(trained, x[0], runs=0)
    with pytest.raises(InferenceError, match="seconds must be a positive number"):
        throughput(trained, x, seconds=0)
