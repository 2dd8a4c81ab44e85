"""Tests for workers.models: shapes per (architecture, kind), presets, custom layers, causality,
gradient checkpointing, a tiny training run, describe_model."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from workers.models import (
    ARCHITECTURES,
    SUPPORTED,
    ModelError,
    TaskInfo,
    blocks,
    build_model,
    check_compatible,
    describe_model,
)

torch.set_num_threads(1)

VOCAB = 50
LEN = 12

TASKS: dict[str, TaskInfo] = {
    "vectors": TaskInfo("vectors", (64,), 10),
    "vectors_odd": TaskInfo("vectors", (10,), 3),
    "images": TaskInfo("images", (3, 12, 10), 4),
    "text": TaskInfo("text", (), 2, vocab_size=VOCAB, max_len=LEN),
    "lm": TaskInfo("lm", (), VOCAB, vocab_size=VOCAB, max_len=LEN),
}


def _batch(task: TaskInfo, n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if task.kind in ("text", "lm"):
        ids = torch.randint(1, task.vocab_size, (n, task.max_len), generator=g)
        if task.kind == "text":
            ids[0, 5:] = 0  # right padding
            ids[1, :] = 0  # all padding
        return ids
    return torch.randn(n, *task.input_shape, generator=g)


def _expected_shape(task: TaskInfo, n: int = 5) -> tuple[int, ...]:
    if task.kind == "lm":
        return (n, task.max_len, task.vocab_size)
    return (n, task.num_classes)


# --------------------------------------------------------------------------- combos


@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_kind_pair(arch: str, task_name: str) -> None:
    task = TASKS[task_name]
    if task.kind not in SUPPORTED[arch]:
        with pytest.raises(ModelError) as cheap:
            check_compatible(arch, task.kind)
        with pytest.raises(ModelError) as built:
            build_model(arch, "base", task)
        for exc in (cheap.value, built.value):
            assert repr(arch) in str(exc) and repr(task.kind) in str(exc)
            assert "use " in str(exc)
        return
    check_compatible(arch, task.kind)
    torch.manual_seed(0)
    model = build_model(arch, "base", task)
    out = model(_batch(task))
    assert out.shape == _expected_shape(task)
    assert torch.isfinite(out).all()
    # every parameter takes part (data-parallel without find_unused_parameters)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    model.eval()
    with torch.no_grad():
        assert model(_batch(task, n=2)).shape == _expected_shape(task, n=2)


def test_messages_for_unsupported() -> None:
    with pytest.raises(ModelError,
                       match="'gnn' is not supported for dataset kind 'text'.*transformer, cnn, rnn or mlp"):
        check_compatible("gnn", "text")
    with pytest.raises(ModelError, match="'cnn' is not supported for dataset kind 'lm'.*transformer or rnn"):
        check_compatible("cnn", "lm")
    with pytest.raises(ModelError, match="unknown architecture"):
        check_compatible("resnet", "images")
    with pytest.raises(ModelError, match="unknown dataset kind"):
        check_compatible("mlp", "audio")
    with pytest.raises(ModelError, match="unknown model preset"):
        build_model("mlp", "huge", TASKS["vectors"])
    with pytest.raises(ModelError, match="set model to 'custom'"):
        build_model("mlp", "base", TASKS["vectors"], layers=[{"type": "dense", "units": 4}])
    with pytest.raises(ModelError, match="needs a 'layers' list"):
        build_model("mlp", "custom", TASKS["vectors"])


def test_input_checks() -> None:
    torch.manual_seed(0)
    text = build_model("transformer", "base", TASKS["text"])
    with pytest.raises(ValueError, match="token id out of range"):
        text(torch.full((2, 4), VOCAB))
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        text(torch.ones(2, LEN + 1, dtype=torch.long))
    vec = build_model("mlp", "base", TASKS["vectors"])
    with pytest.raises(ValueError, match="expects a batch"):
        vec(torch.randn(2, 63))
    # flat images and float64 inputs are accepted
    img = build_model("cnn", "base", TASKS["images"])
    assert img(torch.randn(2, 3 * 12 * 10, dtype=torch.float64)).shape == (2, 4)


def test_deterministic_init() -> None:
    for arch in ("mlp", "cnn", "rnn", "transformer"):
        torch.manual_seed(3)
        a = build_model(arch, "base", TASKS["text"]).state_dict()
        torch.manual_seed(3)
        b = build_model(arch, "base", TASKS["text"]).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), arch


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("arch", ["mlp", "cnn", "rnn", "transformer"])
def test_presets_grow(arch: str) -> None:
    small = {
        "vectors": TaskInfo("vectors", (64,), 10),
        "images": TaskInfo("images", (1, 8, 8), 10),
        "text": TaskInfo("text", (), 2, vocab_size=100, max_len=16),
        "lm": TaskInfo("lm", (), 100, vocab_size=100, max_len=16),
    }
    for kind in SUPPORTED[arch]:
        counts = []
        for preset in ("base", "large", "xl"):
            torch.manual_seed(0)
            counts.append(describe_model(build_model(arch, preset, small[kind]))["parameters"])
        assert counts[0] < counts[1] < counts[2], (arch, kind, counts)


def test_base_parameter_counts() -> None:
    digits = TaskInfo("vectors", (64,), 10)
    text = TaskInfo("text", (), 2, vocab_size=20000, max_len=40)
    # mlp base on digits: 64-128-128-10
    assert describe_model(build_model("mlp", "base", digits))["parameters"] == (
        64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    )
    # transformer base on text: d 64, 2 layers, ffn 128
    layer = (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + (64 * 128 + 128 + 128 * 64 + 64) + 4 * 64
    expected = 20000 * 64 + 40 * 64 + 2 * layer + 2 * 64 + 64 * 2 + 2
    assert describe_model(build_model("transformer", "base", text))["parameters"] == expected


def test_cnn_base_keeps_the_spatial_layout() -> None:
    # conv3x3(32)-GN-ReLU-pool2, conv3x3(64)-GN-ReLU-pool2, flatten, dense 128, classifier
    convs = (1 * 32 * 9 + 32) + 2 * 32 + (32 * 64 * 9 + 64) + 2 * 64
    for task, grid in [(TaskInfo("images", (1, 28, 28), 10), 7 * 7),  # mnist-5k: 28 -> 14 -> 7
                       (TaskInfo("vectors", (64,), 10), 2 * 2),  # digits as 8x8: 8 -> 4 -> 2
                       (TaskInfo("images", (1, 64, 64), 10), 7 * 7)]:  # 16x16 average-pooled to 7x7
        torch.manual_seed(0)
        model = build_model("cnn", "base", task)
        expected = convs + (64 * grid * 128 + 128) + (128 * 10 + 10)
        assert describe_model(model)["parameters"] == expected, task
        assert model(_batch(task, n=3)).shape == (3, 10)


# --------------------------------------------------------------------------- describe_model


def test_describe_model_counts() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", "base", TASKS["lm"])
    info = describe_model(model)
    named = dict(model.named_parameters())  # shared (tied) parameters appear once
    assert info["parameters"] == sum(p.numel() for p in named.values())
    assert info["parameters"] == info["trainable_parameters"]
    # tied head (GPT-2): the output projection is the token embedding, counted once
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    assert not any(p is model.hf.lm_head.weight for n, p in named.items() if "lm_head" in n)
    assert info["size_mb"] == pytest.approx(info["parameters"] * 4 / 2**20, abs=1e-4)
    assert (info["architecture"], info["preset"], info["kind"]) == ("transformer", "base", "lm")

    class Wrapper(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.module = m

    assert describe_model(Wrapper(model))["parameters"] == info["parameters"]
    plain = torch.nn.Linear(3, 2)
    assert describe_model(plain)["parameters"] == 8


# --------------------------------------------------------------------------- custom layers

FLOW_NEXUS_LAYERS = [
    {"type": "embedding", "vocab_size": VOCAB, "embedding_dim": 32},
    {"type": "transformer_block", "num_heads": 4, "hidden_dim": 64, "num_layers": 2},
    {"type": "output", "num_classes": 2},
]


def test_custom_layers_build() -> None:
    torch.manual_seed(0)
    cases = [
        ("transformer", TASKS["text"], FLOW_NEXUS_LAYERS),
        ("transformer", TASKS["lm"], [  # a GPT-2 config
            {"type": "embedding", "embedding_dim": 32},
            {"type": "transformer_block", "num_heads": 2, "hidden_dim": 64, "num_layers": 1},
            {"type": "output", "num_classes": VOCAB},
        ]),
        ("rnn", TASKS["lm"], [
            {"type": "embedding", "embedding_dim": 32},
            {"type": "transformer_block", "num_heads": 2, "hidden_dim": 64, "num_layers": 1},
            {"type": "dense", "units": 32, "activation": "gelu"},
            {"type": "output", "num_classes": VOCAB},
        ]),
        ("rnn", TASKS["text"], [
            {"type": "embedding", "embedding_dim": 16},
            {"type": "lstm", "hidden_size": 8, "num_layers": 2},
            {"type": "dropout", "rate": 0.2},
            {"type": "dense", "units": 8},
            {"type": "output"},
        ]),
        ("rnn", TASKS["lm"], [
            {"type": "embedding", "embedding_dim": 16},
            {"type": "gru", "hidden_size": 16},
        ]),
        ("cnn", TASKS["images"], [
            {"type": "conv2d", "filters": 8, "kernel_size": 3, "pool": 2},
            {"type": "conv2d", "filters": 8, "kernel_size": 3},
            {"type": "maxpool2d"},
            {"type": "dense", "units": 16},
            {"type": "output", "num_classes": 4},
        ]),
        ("cnn", TASKS["vectors"], [
            {"type": "conv", "filters": 4, "kernel_size": 3},
            {"type": "dense", "units": 16, "activation": "tanh"},
            {"type": "output", "num_classes": 10, "activation": "softmax"},
        ]),
        ("mlp", TASKS["vectors_odd"], [
            {"type": "linear", "units": 16},
            {"type": "dropout", "rate": 0.1},
            {"type": "dense", "units": 8, "activation": "relu"},
            {"type": "output"},
        ]),
        ("rnn", TASKS["images"], [{"type": "lstm", "hidden_size": 8}, {"type": "output"}]),
        ("transformer", TASKS["vectors"], [{"type": "transformer_block", "num_heads": 2}]),
    ]
    for arch, task, layers in cases:
        model = build_model(arch, "custom", task, layers=layers)
        out = model(_batch(task))
        assert out.shape == _expected_shape(task), (arch, task.kind, layers)
        out.pow(2).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        info = describe_model(model)
        assert info["preset"] == "custom" and info["parameters"] > 0


def test_custom_transformer_matches_spec_sizes() -> None:
    model = build_model("transformer", "custom", TASKS["text"], layers=FLOW_NEXUS_LAYERS)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert len(layers) == 2
    assert layers[0].linear1.out_features == 64 and layers[0].self_attn.num_heads == 4


def test_custom_vocab_size_from_task_wins(caplog: pytest.LogCaptureFixture) -> None:
    layers = [dict(FLOW_NEXUS_LAYERS[0], vocab_size=999), *FLOW_NEXUS_LAYERS[1:]]
    with caplog.at_level(logging.WARNING, logger="workers.models"):
        model = build_model("transformer", "custom", TASKS["text"], layers=layers)
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert emb[0].num_embeddings == VOCAB
    assert "vocab_size 999" in caplog.text


@pytest.mark.parametrize(
    ("task_name", "layers", "needles"),
    [
        ("text", [FLOW_NEXUS_LAYERS[0], {"type": "attention_pool"}], ["layers[1]", "unknown layer type"]),
        ("text", [FLOW_NEXUS_LAYERS[0], {"type": "transformer_block", "hidden_dim": 64}],
         ["layers[1]", "'num_heads'", "missing"]),
        ("text", [{"type": "embedding", "embedding_dim": 30}, {"type": "transformer_block", "num_heads": 4}],
         ["layers[1]", "'num_heads'", "does not divide", "30"]),
        ("text", [*FLOW_NEXUS_LAYERS[:2], {"type": "output", "num_classes": 3}],
         ["layers[2]", "'num_classes'", "2"]),
        ("lm", [FLOW_NEXUS_LAYERS[0], {"type": "output", "num_classes": 2}],
         ["layers", "transformer_block"]),
        ("text", [{"type": "dense", "units": 8}], ["layers[0]", "embedding"]),
        ("vectors", [{"type": "embedding", "embedding_dim": 8}], ["layers[0]", "embedding"]),
        ("text", [FLOW_NEXUS_LAYERS[0], {"type": "conv2d", "filters": 4, "kernel_size": 3}], ["layers[1]", "conv2d"]),
        ("lm", [FLOW_NEXUS_LAYERS[0], {"type": "lstm", "hidden_size": 8}],
         ["layers[1]", "architecture 'rnn'"]),
        ("vectors", [{"type": "output"}, {"type": "dense", "units": 4}], ["layers[0]", "last"]),
        ("vectors", [{"type": "dense", "units": 0}], ["layers[0]", "'units'"]),
        ("vectors", [{"type": "dense", "units": "many"}], ["layers[0]", "'units'"]),
        ("vectors", [{"type": "dropout", "rate": 1.5}], ["layers[0]", "'rate'"]),
        ("vectors", [{"type": "dense", "units": 4, "activation": "wiggle"}], ["layers[0]", "'activation'"]),
        ("vectors", [{"units": 4}], ["layers[0]", "'type'"]),
        ("vectors", [{"type": "dense", "units": 4}, {"type": "lstm", "hidden_size": 4}], ["layers[1]", "sequence"]),
        ("images", [{"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": 20},
                    {"type": "maxpool2d", "pool_size": 4}], ["layers[1]", "shrinks"]),
    ],
)
def test_bad_custom_layers(task_name: str, layers: list[dict], needles: list[str]) -> None:
    with pytest.raises(ModelError) as exc:
        build_model("transformer", "custom", TASKS[task_name], layers=layers)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


# --------------------------------------------------------------------------- causality


def _lm_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        build_model("transformer", "base", TASKS["lm"]),
        build_model("rnn", "base", TASKS["lm"]),
        build_model("transformer", "custom", TASKS["lm"], layers=[
            {"type": "embedding", "embedding_dim": 16},
            {"type": "transformer_block", "num_heads": 2, "num_layers": 2},
        ]),
        build_model("rnn", "custom", TASKS["lm"], layers=[
            {"type": "embedding", "embedding_dim": 16},
            {"type": "transformer_block", "num_heads": 2, "num_layers": 2},
            {"type": "lstm", "hidden_size": 16},
        ]),
    ]


def test_lm_is_causal() -> None:
    ids = _batch(TASKS["lm"], n=3)
    for model in _lm_models():
        model.eval()
        with torch.no_grad():
            base = model(ids)
            for t in (0, 4, LEN - 2):
                changed = ids.clone()
                changed[:, t + 1:] = (changed[:, t + 1:] % (VOCAB - 1)) + 1  # change every later token
                assert not torch.equal(changed[:, t + 1], ids[:, t + 1])
                out = model(changed)
                assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), (type(model), t)
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)


def test_text_classifier_ignores_padding() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", "base", TASKS["text"]).eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids), model(padded), atol=1e-5)


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize(
    ("arch", "preset", "task_name", "layers"),
    [
        ("transformer", "base", "text", None),
        ("rnn", "base", "lm", None),  # the GPT-2 LM: tests/workers/test_lm_core.py
        ("mlp", "base", "vectors", None),
        ("cnn", "base", "images", None),
        ("cnn", "base", "text", None),
        ("rnn", "large", "text", None),
        ("transformer", "custom", "text", FLOW_NEXUS_LAYERS + []),
        ("cnn", "custom", "vectors", [{"type": "conv2d", "filters": 4, "kernel_size": 3},
                                      {"type": "dense", "units": 8}, {"type": "dropout", "rate": 0.3}]),
    ],
)
def test_gradient_checkpointing_is_exact(arch, preset, task_name, layers, monkeypatch) -> None:
    task = TASKS[task_name]
    calls = []
    real = blocks.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(blocks, "checkpoint", counting)
    x = _batch(task, n=4)
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = build_model(arch, preset, task, layers=layers, gradient_checkpointing=gc)
        model.train()  # dropout active: the RNG state must be replayed exactly
        torch.manual_seed(1)
        out = model(x)
        out.float().pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls and all(c is False for c in calls)
    n_calls = len(calls)
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=0), name
    # not active in eval mode / without grad
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == n_calls
    assert describe_model(model)["gradient_checkpointing"] is True


# --------------------------------------------------------------------------- tiny training


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_mlp_learns_separable_vectors() -> None:
    torch.manual_seed(0)
    centers = torch.randn(3, 20) * 3
    y = torch.randint(0, 3, (600,))
    x = centers[y] + torch.randn(600, 20)
    model = build_model("mlp", "base", TaskInfo("vectors", (20,), 3))
    assert _train(model, x, y, steps=60, lr=3e-3) > 0.9


def test_transformer_learns_keyword_text() -> None:
    torch.manual_seed(0)
    n, length, vocab = 800, 16, 200
    ids = torch.randint(3, vocab, (n, length))
    y = torch.randint(0, 2, (n,))
    pos = torch.randint(0, 10, (n,))
    ids[torch.arange(n), pos] = torch.where(y == 1, 1, 2)  # keyword 1 = positive, 2 = negative
    lengths = torch.randint(10, length + 1, (n,))
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0  # right padding
    model = build_model("transformer", "base", TaskInfo("text", (), 2, vocab_size=vocab, max_len=length))
    assert _train(model, ids, y, steps=150, lr=3e-3) > 0.9
