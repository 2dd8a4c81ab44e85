"""Custom models from a Flow Nexus ``layers`` list, checked against the dataset."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from .blocks import EncoderStack, ceil_sqrt, rnn_cls
from .stages import CustomNet, EmbedStage, EncoderStage, ModuleStage, RecurrentStage, Reshape, Stage
from .task import ModelError, TaskInfo, out_classes, task_max_len

log = logging.getLogger(__name__)

_TYPE_ALIASES = {
    "embedding": "embedding",
    "transformer_block": "transformer_block", "transformer": "transformer_block",
    "transformer_encoder": "transformer_block", "attention": "transformer_block",
    "lstm": "lstm", "gru": "gru",
    "dense": "dense", "linear": "dense", "fc": "dense",
    "dropout": "dropout",
    "conv2d": "conv2d", "conv": "conv2d",
    "maxpool2d": "maxpool2d", "maxpool": "maxpool2d", "pool": "maxpool2d",
    "output": "output",
}
_LAYER_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required keys, optional keys)
    "embedding": (("embedding_dim",), ("vocab_size", "dropout")),
    "transformer_block": (("num_heads",), ("hidden_dim", "num_layers", "dropout")),
    "lstm": (("hidden_size",), ("num_layers", "bidirectional", "dropout")),
    "gru": (("hidden_size",), ("num_layers", "bidirectional", "dropout")),
    "dense": (("units",), ("activation",)),
    "dropout": (("rate",), ()),
    "conv2d": (("filters", "kernel_size"), ("stride", "activation", "pool")),
    "maxpool2d": ((), ("pool_size",)),
    "output": ((), ("num_classes", "activation")),
}
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "silu": nn.SiLU, "swish": nn.SiLU,
    "linear": nn.Identity, "none": nn.Identity,
}
_EXAMPLES = {
    "embedding_dim": 64, "num_heads": 4, "hidden_dim": 128, "num_layers": 2, "hidden_size": 64,
    "units": 128, "rate": 0.1, "filters": 32, "kernel_size": 3, "num_classes": 2, "pool_size": 2,
}


def _layer_error(i: int, type_: str, msg: str) -> ModelError:
    return ModelError(f"layers[{i}] ({type_}): {msg}")


class _LayerReader:
    def __init__(self, i: int, type_: str, spec: dict[str, Any]) -> None:
        self.i, self.type, self.spec = i, type_, spec
        required, optional = _LAYER_KEYS[type_]
        known = {"type", *required, *optional}
        for key in required:
            if key not in spec or spec[key] is None:
                example = _EXAMPLES.get(key, "...")
                raise _layer_error(i, type_, f"required key {key!r} is missing; add e.g. \"{key}\": {example}")
        extra = sorted(set(spec) - known)
        if extra:
            log.warning("layers[%d] (%s): ignoring unknown keys %s (known: %s)",
                        i, type_, extra, ", ".join(sorted(known - {"type"})))

    def err(self, msg: str) -> ModelError:
        return _layer_error(self.i, self.type, msg)

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.spec.get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(f"{key!r} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise self.err(f"{key!r} must be >= {minimum}, got {value}")
        return value

    def rate(self, key: str, default: float = 0.0) -> float:
        value = self.spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise self.err(f"{key!r} must be a number in [0, 1), got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.spec.get(key, default)
        if not isinstance(value, bool):
            raise self.err(f"{key!r} must be true or false, got {value!r}")
        return value

    def activation(self, key: str = "activation", default: str = "relu") -> nn.Module:
        value = self.spec.get(key, default)
        name = "none" if value is None else str(value).lower()
        if name not in _ACTIVATIONS:
            raise self.err(f"{key!r} = {value!r} is unknown; use one of {', '.join(_ACTIVATIONS)}")
        return _ACTIVATIONS[name]()


def build_custom(architecture: str, task: TaskInfo, layers: list[dict[str, Any]]) -> CustomNet:
    """Build a model from a layer list, checking it against the dataset.

    Supported layer types (aliases in brackets), required keys first:

    * ``embedding`` {embedding_dim; vocab_size, dropout}: text/lm only, must be first (and is
      required first for text/lm). The dataset's vocab_size wins over the layer's. Adds a
      learned positional embedding when the list has a transformer_block.
    * ``transformer_block`` [transformer] {num_heads; hidden_dim=4*width, num_layers=1,
      dropout=0.1}: pre-norm encoder layers, causal for lm.
    * ``lstm`` / ``gru`` {hidden_size; num_layers=1, bidirectional (True, False for lm), dropout}.
    * ``dense`` [linear, fc] {units; activation=relu}: per token on sequences.
    * ``dropout`` {rate}.
    * ``conv2d`` [conv] {filters, kernel_size; stride=1, activation=relu, pool=0}: images, or
      vectors reshaped to a square (64 features -> 1x8x8); ``pool`` > 1 adds max pooling.
    * ``maxpool2d`` [pool] {pool_size=2}.
    * ``output`` {num_classes (must match the dataset); activation (ignored: logits)}: last;
      appended when missing. Sequences are mean-pooled over non-PAD tokens before it (kept per
      token for lm); images are flattened.

    Images and vectors become sequences of rows for lstm/gru/transformer_block.
    """
    specs = _layer_types(layers)
    for i, (type_, _) in enumerate(specs):
        if type_ == "output" and i != len(specs) - 1:
            raise _layer_error(i, type_, "the output layer must be the last layer")
    if specs[-1][0] != "output":
        log.info("custom layers: no output layer given; appending output(num_classes=%d)", out_classes(task))
        specs.append(("output", {"type": "output"}))
    has_attention = any(t == "transformer_block" for t, _ in specs)
    n_pos = task_max_len(task) if task.kind in ("text", "lm") and has_attention else 0
    assembler = _Assembler(task, n_pos)
    for i, (type_, spec) in enumerate(specs):
        assembler.add(i, type_, spec)
    config = {"layers": [dict(s) for _, s in specs], "max_len": n_pos}
    return CustomNet(architecture, task, assembler.stages, config)


def _layer_types(layers: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(canonical type, spec) of every layer; raises on a list that is not a list of typed layers."""
    if not isinstance(layers, list) or not layers:
        raise ModelError("model 'custom' needs a non-empty 'layers' list, e.g. "
                         "[{\"type\": \"dense\", \"units\": 128}, {\"type\": \"output\"}]")
    specs: list[tuple[str, dict[str, Any]]] = []
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict):
            raise ModelError(f"layers[{i}]: each layer must be an object with a 'type', got {spec!r}")
        raw = spec.get("type")
        if raw is None:
            raise ModelError(f"layers[{i}]: required key 'type' is missing; one of "
                             f"{', '.join(sorted(set(_TYPE_ALIASES.values())))}")
        type_ = _TYPE_ALIASES.get(str(raw).lower())
        if type_ is None:
            raise ModelError(
                f"layers[{i}]: unknown layer type {raw!r}; supported types: "
                f"{', '.join(sorted(set(_TYPE_ALIASES.values())))}"
            )
        specs.append((type_, spec))
    return specs


class _Assembler:
    """Turns checked layer specs into stages, tracking the form of the data between layers.

    form: tokens | seq | flat | image | vector (raw vector data, may become image / rows);
    ``dim`` is the width of a seq or flat form, ``image`` the (C, H, W) of an image form.
    """

    def __init__(self, task: TaskInfo, n_pos: int) -> None:
        self.task, self.kind, self.n_pos = task, task.kind, n_pos
        self.n_classes = out_classes(task)
        self.stages: list[Stage] = []
        self.image: tuple[int, ...] = (0, 0, 0)
        self.dim = 0
        if self.kind in ("text", "lm"):
            self.form = "tokens"
        elif self.kind == "vectors":
            self.form, self.dim = "vector", task.input_shape[0]
        else:
            self.form, self.image = "image", tuple(task.input_shape)
        self.side = ceil_sqrt(task.input_shape[0]) if self.kind == "vectors" else 0
        self._adders: dict[str, Callable[[_LayerReader], None]] = {
            "embedding": self._embedding, "transformer_block": self._transformer_block,
            "lstm": self._recurrent, "gru": self._recurrent, "dense": self._dense,
            "dropout": self._dropout, "conv2d": self._conv_or_pool, "maxpool2d": self._conv_or_pool,
            "output": self._output,
        }

    def add(self, i: int, type_: str, spec: dict[str, Any]) -> None:
        r = _LayerReader(i, type_, spec)
        if self.kind in ("text", "lm") and i == 0 and type_ != "embedding":
            raise r.err(f"{self.kind} data needs an 'embedding' layer first, e.g. "
                        "{\"type\": \"embedding\", \"embedding_dim\": 64}")
        self._adders[type_](r)

    def _to_seq(self, r: _LayerReader) -> int:
        if self.form == "seq":
            return self.dim
        if self.form == "vector":
            self.stages.append(Reshape("vector_to_seq", self.side))
            self.form = "seq"
            return self.side
        if self.form == "image":
            self.stages.append(Reshape("image_to_seq"))
            self.form = "seq"
            return self.image[0] * self.image[2]
        raise r.err("needs a sequence (token embeddings, image rows or raw vector rows) but "
                    "follows a flattening layer; move it before dense layers")

    def _flatten(self) -> None:
        if self.form == "image":
            self.stages.append(Reshape("flatten"))
            self.form, self.dim = "flat", math.prod(self.image)
        elif self.form == "vector":
            self.form = "flat"

    def _embedding(self, r: _LayerReader) -> None:
        task = self.task
        if self.kind not in ("text", "lm"):
            raise r.err(f"an embedding layer needs token data (text or lm), but the dataset "
                        f"kind is {self.kind!r}; remove it")
        if r.i != 0:
            raise r.err("the embedding layer must be the first layer")
        e = r.int("embedding_dim")
        if "vocab_size" in r.spec and r.spec["vocab_size"] is not None:
            given = r.int("vocab_size")
            if given != task.vocab_size:
                log.warning("layers[%d] (embedding): vocab_size %d differs from the dataset's "
                            "vocabulary %d; using %d", r.i, given, task.vocab_size, task.vocab_size)
        self.stages.append(EmbedStage(task.vocab_size, e, self.n_pos, self.kind == "text", r.rate("dropout")))
        self.form, self.dim = "seq", e

    def _transformer_block(self, r: _LayerReader) -> None:
        d = self._to_seq(r)
        heads = r.int("num_heads")
        if d % heads:
            divisors = [h for h in range(1, min(d, 16) + 1) if d % h == 0]
            raise r.err(
                f"'num_heads' = {heads} does not divide the model width {d} (embedding_dim "
                f"or the previous layer's size); use num_heads in {divisors} or change the width"
            )
        ffn = r.int("hidden_dim", 4 * d)
        n = r.int("num_layers", 1)
        self.stages.append(EncoderStage(EncoderStack(d, heads, ffn, n, r.rate("dropout", 0.1),
                                                     causal=self.kind == "lm")))
        self.dim = d

    def _recurrent(self, r: _LayerReader) -> None:
        d = self._to_seq(r)
        hidden = r.int("hidden_size")
        n = r.int("num_layers", 1)
        bidir = r.bool("bidirectional", self.kind != "lm")
        if bidir and self.kind == "lm":
            raise r.err("'bidirectional' must be false for language modelling (a backward "
                        "pass would see the tokens it has to predict)")
        rnn = rnn_cls(r.type)(d, hidden, num_layers=n, batch_first=True, bidirectional=bidir,
                              dropout=r.rate("dropout") if n > 1 else 0.0)
        self.stages.append(RecurrentStage(rnn))
        self.dim = hidden * (2 if bidir else 1)

    def _dense(self, r: _LayerReader) -> None:
        self._flatten()
        units = r.int("units")
        self.stages.append(ModuleStage(nn.Sequential(nn.Linear(self.dim, units), r.activation()), ckpt=True))
        self.dim = units

    def _dropout(self, r: _LayerReader) -> None:
        self.stages.append(ModuleStage(nn.Dropout(r.rate("rate"))))

    def _conv_or_pool(self, r: _LayerReader) -> None:
        if self.form == "vector":
            self.stages.append(Reshape("vector_to_image", self.side))
            self.form, self.image = "image", (1, self.side, self.side)
        if self.form != "image":
            raise r.err(f"{r.type} needs image data (or raw vectors that reshape to a square); "
                        f"here it gets {'token sequences' if self.kind in ('text', 'lm') else 'flat features'}"
                        "; remove it or put it before dense/lstm layers")
        c, h, w = self.image
        if r.type == "conv2d":
            filters = r.int("filters")
            k = r.int("kernel_size")
            stride = r.int("stride", 1)
            pool = r.int("pool", 1)
            mods: list[nn.Module] = [nn.Conv2d(c, filters, k, stride=stride, padding=k // 2),
                                     r.activation()]
            h = (h + 2 * (k // 2) - k) // stride + 1
            w = (w + 2 * (k // 2) - k) // stride + 1
            if pool > 1:
                mods.append(nn.MaxPool2d(pool))
                h, w = h // pool, w // pool
            c = filters
            self.stages.append(ModuleStage(nn.Sequential(*mods), ckpt=True))
        else:
            pool = r.int("pool_size", 2)
            self.stages.append(ModuleStage(nn.MaxPool2d(pool)))
            h, w = h // pool, w // pool
        if h < 1 or w < 1:
            raise r.err(f"the image shrinks to {h}x{w} here; use a smaller stride/pool or fewer layers")
        self.image = (c, h, w)

    def _output(self, r: _LayerReader) -> None:
        n_classes = self.n_classes
        if r.spec.get("num_classes") is not None:
            got = r.int("num_classes")
            if got != n_classes:
                what = "vocabulary size" if self.kind == "lm" else "number of classes"
                raise r.err(f"'num_classes' = {got} but the dataset's {what} is {n_classes}; "
                            f"set it to {n_classes} or leave it out")
        act = r.spec.get("activation")
        if act not in (None, "softmax", "linear", "none", "log_softmax"):
            raise r.err(f"'activation' = {act!r}: the output layer returns logits; "
                        "leave activation out (softmax is applied by the loss)")
        if self.form == "seq" and self.kind != "lm":
            self.stages.append(Reshape("pool_seq"))
            self.form = "flat"
        else:
            self._flatten()
        self.stages.append(ModuleStage(nn.Linear(self.dim, n_classes)))
