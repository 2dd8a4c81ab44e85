"""Node-side inference: parse prediction inputs, run a trained model, quantize, profile.

Everything here works on a *trained model* object described structurally by
:class:`TrainedLike` (the trainer's ``TrainedModel`` dataclass fits it): ``model``, ``task``,
``tokenizer``, ``label_names``, ``architecture``, ``preset``, ``max_len`` and optionally
``local_model``. This module does not import the trainer.

* :func:`parse_inputs` turns a prediction payload (one example or a batch, bare or inside an
  object with optional labels) into the model's input form, with errors that say which example
  is wrong and what the model takes.
* :func:`predict_proba` returns softmax class probabilities ``(n, classes)``.
* :func:`quantize_dynamic_int8` makes an int8 dynamically quantized CPU copy of a model;
  :func:`model_size_bytes` measures a model's serialised ``state_dict``.
* :func:`latency_profile` and :func:`throughput` time the whole serving path (parse, tokenise,
  forward, softmax) with ``time.perf_counter``.

Language models (dataset kind ``lm``) are not served here: prediction is for classifiers, and
an LM's quality is reported by ``neural_train_distributed`` (validation loss / perplexity).

Nothing here prints: stdout of the node process is a protocol stream.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .data import Tokenizer
from .models import TaskInfo

log = logging.getLogger(__name__)

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "InferenceError",
    "TrainedLike",
    "latency_profile",
    "model_size_bytes",
    "parse_inputs",
    "predict_proba",
    "quantize_dynamic_int8",
    "throughput",
]

INPUT_KEYS: tuple[str, ...] = ("inputs", "input", "data", "X", "x", "features", "text", "texts")
"""Keys of the object form that hold the examples (exactly one may be present)."""

LABEL_KEYS: tuple[str, ...] = ("labels", "label", "y", "targets", "target")
"""Keys of the object form that hold optional true labels."""

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU)
"""Module types replaced by dynamically quantized int8 versions (exact types only)."""

MIN_QUANTIZED_WEIGHTS = 1024
"""Layers with fewer weights stay float: int8 packing costs ~0.5 KB per layer, more than it
saves on a tiny layer (e.g. a 64x2 output layer), and small layers lose most accuracy."""


class InferenceError(ValueError):
    """A prediction request that cannot be served; the message is shown to the user as is."""


class TrainedLike(Protocol):
    """What inference needs from a trained model (the trainer's ``TrainedModel`` fits)."""

    model: nn.Module
    task: TaskInfo
    tokenizer: Tokenizer | None
    label_names: list[str]
    architecture: str
    preset: str
    max_len: int
    # ``local_model: nn.Module | None`` is optional (read with getattr).


# --------------------------------------------------------------------------------------
# Input parsing
# --------------------------------------------------------------------------------------


def _what(v: Any) -> str:
    """A short description of a value's type for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, (int, float, np.number)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        s = v if len(v) <= 30 else v[:27] + "..."
        return f"text ({s!r})"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple, np.ndarray)):
        return f"a list of {len(v)} items"
    return f"a {type(v).__name__}"


def _is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0)


def _depth(v: Any) -> int:
    """Nesting depth following first elements (a number is 0, [1, 2] is 1)."""
    d = 0
    while _is_seq(v):
        d += 1
        if len(v) == 0:
            break
        v = v[0]
    return d


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _bad_leaf(v: Any, path: tuple[int, ...] = ()) -> tuple[tuple[int, ...], Any] | None:
    """The first value in a nested list that is not a real number, with its position."""
    if _is_seq(v):
        for i, item in enumerate(v):
            found = _bad_leaf(item, path + (i,))
            if found is not None:
                return found
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return path, v
    return None


def _numeric(v: Any) -> np.ndarray | None:
    """``v`` as a float32 array, or None when it is ragged or holds non-numbers."""
    if isinstance(v, np.ndarray):
        arr = v
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.asarray(v)
        except (ValueError, TypeError):
            return None
    if arr.dtype.kind not in "iuf":
        return None
    return arr.astype(np.float32, copy=False)


def _value_error(example: int | None, v: Any, kind_words: str) -> InferenceError:
    """Error for a payload that is ragged or holds something other than numbers."""
    where = f"example {example}" if example is not None else "the input"
    bad = _bad_leaf(v)
    if bad is not None:
        path, leaf = bad
        pos = "".join(f"[{i}]" for i in path)
        at = f" at position {pos}" if pos else ""
        return InferenceError(
            f"{where} holds {_what(leaf)}{at}; a {kind_words} model takes numbers only"
        )
    return InferenceError(
        f"{where} is ragged (its rows have different lengths); a {kind_words} model takes "
        "rectangular lists of numbers"
    )


def _check_finite(arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        flat = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
        raise InferenceError(
            f"example {int(flat[0]) + 1} holds NaN or infinity; send finite numbers"
        )


def _vectors(payload: Any, task: TaskInfo) -> np.ndarray:
    d = int(task.input_shape[0])
    arr = _numeric(payload)
    if arr is None:
        if _depth(payload) >= 2:
            for i, ex in enumerate(payload, 1):
                if not _is_seq(ex):
                    raise InferenceError(
                        f"example {i} is {_what(ex)}, not a feature vector; send one vector of "
                        f"{d} numbers or a list of such vectors"
                    )
                a = _numeric(ex)
                if a is None:
                    raise _value_error(i, ex, "feature-vector")
                if a.ndim != 1:
                    raise InferenceError(
                        f"example {i} is nested {a.ndim} levels deep; each example must be a flat "
                        f"list of {d} numbers"
                    )
                if a.shape[0] != d:
                    raise InferenceError(f"example {i} has {a.shape[0]} features, the model takes {d}")
            raise InferenceError(f"the examples have mixed shapes; send lists of {d} numbers each")
        raise _value_error(None, payload, "feature-vector")
    if arr.ndim == 0:
        raise InferenceError(f"the input is a single number; the model takes vectors of {d} numbers")
    if arr.ndim == 1:
        if arr.shape[0] == 0:
            raise InferenceError("no examples: the input is empty")
        if d == 1 and arr.shape[0] != 1:
            arr = arr.reshape(-1, 1)  # several one-feature examples
        elif arr.shape[0] != d:
            raise InferenceError(f"the input has {arr.shape[0]} features, the model takes {d}")
        else:
            arr = arr.reshape(1, d)
    elif arr.ndim == 2:
        if arr.shape[0] == 0:
            raise InferenceError("no examples: the input is empty")
        if arr.shape[1] != d:
            raise InferenceError(f"example 1 has {arr.shape[1]} features, the model takes {d}")
    else:
        raise InferenceError(
            f"the input has shape {_shape_str(arr.shape)}; the model takes one vector of {d} "
            f"numbers or a list of them (shape (n, {d}))"
        )
    return arr


def _image_forms(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    forms = [f"{_shape_str(shape)} nested lists"]
    if c == 1:
        forms.append(f"({h}, {w})")
    forms.append(f"{c * h * w} flat values")
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def _image_example(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """One example in any accepted form -> (C, H, W), or None if it does not fit."""
    c, h, w = shape
    if a.shape == shape or (c == 1 and a.shape == (h, w)) or (a.ndim == 1 and a.shape[0] == c * h * w):
        return a.reshape(shape)
    return None


def _images(payload: Any, task: TaskInfo) -> np.ndarray:
    shape = tuple(int(s) for s in task.input_shape)
    c, h, w = shape
    n_values = c * h * w
    forms = _image_forms(shape)
    arr = _numeric(payload)
    if arr is None:
        depth = _depth(payload)
        batch = depth == 4 or (depth == 3 and c == 1) or (
            depth == 2 and not (c == 1 and len(payload) == h and len(payload[0]) == w))
        if not batch:
            raise _value_error(None, payload, "image")
        for i, ex in enumerate(payload, 1):
            if not _is_seq(ex):
                raise InferenceError(f"example {i} is {_what(ex)}, not an image; each example takes {forms}")
            a = _numeric(ex)
            if a is None:
                raise _value_error(i, ex, "image")
            if _image_example(a, shape) is None:
                raise InferenceError(
                    f"example {i} has shape {_shape_str(a.shape)}, the model takes {forms}"
                )
        raise InferenceError(f"the examples have mixed shapes; each example takes {forms}")
    if arr.size == 0:
        raise InferenceError("no examples: the input is empty")
    if arr.ndim == 4:
        if arr.shape[1:] != shape:
            raise InferenceError(
                f"example 1 has shape {_shape_str(arr.shape[1:])}, the model takes {forms}"
            )
        return arr
    if arr.ndim == 3:
        if arr.shape == shape:
            return arr.reshape(1, *shape)
        if c == 1 and arr.shape[1:] == (h, w):
            return arr.reshape(arr.shape[0], *shape)
        if c == 1:
            raise InferenceError(
                f"example 1 has shape {_shape_str(arr.shape[1:])}, the model takes {forms}"
            )
        raise InferenceError(f"the input has shape {_shape_str(arr.shape)}, the model takes {forms}")
    if arr.ndim == 2:
        if c == 1 and arr.shape == (h, w):
            return arr.reshape(1, *shape)
        if arr.shape[1] == n_values:
            return arr.reshape(arr.shape[0], *shape)
        raise InferenceError(
            f"the input has shape {_shape_str(arr.shape)}; the model takes {forms} per example"
            + (f" (example 1 has {arr.shape[1]} values)" if arr.shape[0] > 1 else "")
        )
    if arr.ndim == 1:
        if arr.shape[0] != n_values:
            raise InferenceError(
                f"the input has {arr.shape[0]} values, the model takes {forms}"
            )
        return arr.reshape(1, *shape)
    raise InferenceError(f"the input has shape {_shape_str(arr.shape)}, the model takes {forms}")


def _texts(payload: Any) -> list[str]:
    if isinstance(payload, str):
        return [payload]
    if isinstance(payload, np.ndarray):
        payload = payload.tolist()
    if not isinstance(payload, (list, tuple)):
        raise InferenceError(
            f"the input is {_what(payload)}; a text model takes a string or a list of strings"
        )
    if len(payload) == 0:
        raise InferenceError("no examples: the input is empty")
    for i, t in enumerate(payload, 1):
        if not isinstance(t, str):
            raise InferenceError(f"example {i} is {_what(t)}; a text model takes strings")
    return list(payload)


def _maybe_json(payload: str, task: TaskInfo) -> Any:
    """Decode a JSON string payload; a text model's plain string is one example."""
    s = payload.strip()
    if not s:
        raise InferenceError("no examples: the input is empty")
    if task.kind in ("text", "lm"):
        if s[:1] in ("[", "{"):
            try:
                decoded = json.loads(s)
            except ValueError:
                return payload
            if isinstance(decoded, dict) or (
                isinstance(decoded, list) and decoded and all(isinstance(t, str) for t in decoded)
            ):
                return decoded
        return payload
    try:
        return json.loads(s)
    except ValueError:
        what = "feature vectors" if task.kind == "vectors" else "images"
        raise InferenceError(
            f"the input is text that is not JSON ({_what(payload)}); a {task.kind} model takes "
            f"{what} as numbers, e.g. [[0.1, 0.2, ...], ...]"
        ) from None


def _unwrap(payload: dict[str, Any]) -> tuple[Any, Any]:
    inputs = [k for k in INPUT_KEYS if k in payload]
    labels = [k for k in LABEL_KEYS if k in payload]
    if not inputs:
        raise InferenceError(
            "the input object holds no examples; put them under one of "
            f"{', '.join(repr(k) for k in INPUT_KEYS)} (got keys: "
            f"{', '.join(repr(str(k)) for k in payload) or 'none'})"
        )
    if len(inputs) > 1:
        raise InferenceError(
            f"the input object has several example keys ({', '.join(repr(k) for k in inputs)}); use one"
        )
    if len(labels) > 1:
        raise InferenceError(
            f"the input object has several label keys ({', '.join(repr(k) for k in labels)}); use one"
        )
    x = payload[inputs[0]]
    if isinstance(x, dict):
        raise InferenceError(f"{inputs[0]!r} holds an object; it must hold the examples themselves")
    return x, payload[labels[0]] if labels else None


def _label_index(v: Any, i: int, task: TaskInfo, label_names: Sequence[str] | None) -> int:
    k = task.num_classes
    names = list(label_names or [])
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str):
        s = v.strip()
        if s in names:
            return names.index(s)
        folded = [n.strip().lower() for n in names]
        if s.lower() in folded:
            return folded.index(s.lower())
        if not names:
            try:
                v = int(s)
            except ValueError:
                v = None
        if not isinstance(v, int):
            known = ", ".join(names) if names else f"class indices 0-{k - 1}"
            raise InferenceError(
                f"label of example {i} is {s!r}, an unknown label; the model's labels are {known}"
            )
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InferenceError(
            f"label of example {i} is {_what(v)}; labels are class indices or label names"
        )
    if not 0 <= v < k:
        raise InferenceError(
            f"label of example {i} is {v}, but the model has {k} classes (indices 0-{k - 1})"
        )
    return v


def parse_inputs(
    payload: Any, task: TaskInfo, label_names: Sequence[str] | None = None
) -> tuple[list[str] | np.ndarray, list[int] | None]:
    """Turn a prediction payload into ``(examples, labels)`` in the model's input form.

    ``examples`` is ``list[str]`` for text (and lm) models and float32
    ``(n, *task.input_shape)`` for vectors / images; ``labels`` is a list of class indices
    when the payload carried labels, else ``None``.

    Accepted forms: one example or a batch, bare or in an object
    ``{"inputs"|"data"|"X"|"features"|"text"|"texts": examples, "labels"|"y"|"targets": [...]}``.
    Text models take a string or a list of strings; vector models one list of ``d`` numbers or
    a list of them; image models ``(C, H, W)`` nested lists, ``(H, W)`` when ``C == 1``, or
    ``C*H*W`` flat values, one or a batch. A JSON string is decoded (for text models only when
    it decodes to a list of strings or an object; otherwise it is the text). Labels are class
    indices or names from ``label_names`` (case-insensitive). Raises :class:`InferenceError`.
    """
    if isinstance(payload, (bytes, bytearray)):
        payload = payload.decode("utf-8", errors="replace")
    if isinstance(payload, str):
        payload = _maybe_json(payload, task)
    raw_labels = None
    if isinstance(payload, dict):
        payload, raw_labels = _unwrap(payload)
    if payload is None:
        raise InferenceError("no examples: the input is null")
    if task.kind in ("text", "lm"):
        examples: list[str] | np.ndarray = _texts(payload)
    elif task.kind == "vectors":
        examples = _vectors(payload, task)
        _check_finite(examples)
    elif task.kind == "images":
        examples = _images(payload, task)
        _check_finite(examples)
    else:
        raise InferenceError(f"unknown dataset kind {task.kind!r}")
    n = len(examples)
    if raw_labels is None:
        return examples, None
    if task.kind == "lm":
        raise InferenceError("a language model takes no labels; send only the text")
    if isinstance(raw_labels, np.ndarray):
        raw_labels = raw_labels.tolist()
    if not isinstance(raw_labels, (list, tuple)):
        raw_labels = [raw_labels]
    if len(raw_labels) != n:
        raise InferenceError(
            f"{len(raw_labels)} label{'s' if len(raw_labels) != 1 else ''} for {n} "
            f"example{'s' if n != 1 else ''}; send one label per example"
        )
    labels = [_label_index(v, i, task, label_names) for i, v in enumerate(raw_labels, 1)]
    return examples, labels


# --------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _pick_model(trained: TrainedLike, local: bool, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    if local:
        lm = getattr(trained, "local_model", None)
        if lm is not None:
            return lm
        log.debug("local prediction asked but the node holds no local model; using the global one")
    return trained.model


def _check_servable(trained: TrainedLike) -> TaskInfo:
    task = trained.task
    if task.kind == "lm":
        raise InferenceError(
            "this is a language model; neural_predict_distributed serves classifiers. Read the "
            "language model's validation loss and perplexity from the neural_train_distributed "
            "metrics (neural_cluster_status) instead"
        )
    if task.kind == "text" and trained.tokenizer is None:
        raise InferenceError("the text model has no tokenizer; it cannot read text (retrain it)")
    return task


def _max_len(trained: TrainedLike) -> int:
    m = int(getattr(trained, "max_len", 0) or 0) or int(trained.task.max_len or 0)
    if m < 1:
        raise InferenceError("the text model does not record its sequence length (max_len)")
    return m


def _forward_proba(trained: TrainedLike, net: nn.Module, x: list[str] | np.ndarray,
                   batch_size: int) -> np.ndarray:
    task = trained.task
    n = len(x)
    device = _device(net)
    batch_size = max(1, int(batch_size))
    max_len = _max_len(trained) if task.kind == "text" else 0
    out: list[np.ndarray] = []
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = x[start:start + batch_size]
                if task.kind == "text":
                    assert trained.tokenizer is not None
                    t = torch.from_numpy(trained.tokenizer.encode(chunk, max_len))
                else:
                    t = torch.from_numpy(np.ascontiguousarray(chunk))
                logits = net(t.to(device))
                if logits.dim() != 2 or logits.shape[0] != len(chunk):
                    raise InferenceError(
                        f"the model returned outputs of shape {tuple(logits.shape)} for "
                        f"{len(chunk)} examples; expected (batch, classes)"
                    )
                out.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    finally:
        if was_training:
            net.train()
    return np.concatenate(out, axis=0)


def predict_proba(trained: TrainedLike, inputs: Any, *, local: bool = False, batch_size: int = 256,
                  model: nn.Module | None = None) -> np.ndarray:
    """Softmax class probabilities, float64 ``(n, classes)``, rows summing to 1.

    ``inputs`` is anything :func:`parse_inputs` accepts (labels in it are ignored). Runs in
    eval mode under ``torch.inference_mode`` (the model's training flag is restored after),
    in batches of ``batch_size``, on the model's device. Text goes through
    ``trained.tokenizer.encode(texts, trained.max_len)``. ``local=True`` uses
    ``trained.local_model`` when the node holds one (federated: the node's own model before
    aggregation); ``model`` overrides both (e.g. a quantized copy).
    """
    _check_servable(trained)
    x, _ = parse_inputs(inputs, trained.task, trained.label_names)
    return _forward_proba(trained, _pick_model(trained, local, model), x, batch_size)


# --------------------------------------------------------------------------------------
# Quantization and size
# --------------------------------------------------------------------------------------


def _unwrap_model(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "task"):
        model = model.module  # DDP / wrappers
    return model


def _quantize_names(model: nn.Module, min_weights: int) -> list[str]:
    """Leaf modules to quantize: exact Linear/LSTM/GRU with at least ``min_weights`` weights,
    minus weight-tied Linear layers, and keeping the last Linear in float when nothing
    floating would otherwise remain."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    names: list[str] = []
    linear_names: list[str] = []
    for name, mod in model.named_modules():
        if type(mod) not in QUANTIZABLE_TYPES:
            continue
        n_weights = sum(p.numel() for n, p in mod.named_parameters() if "weight" in n)
        if n_weights < min_weights:
            log.debug("int8: keeping %s in float (%d weights < %d)", name, n_weights, min_weights)
            continue
        if type(mod) is nn.Linear:
            if len(owners.get(id(mod.weight), [])) > 1:
                # Tied to an embedding: a quantized copy would store the matrix twice.
                log.debug("int8: keeping %s in float (weight tied to another module)", name)
                continue
            linear_names.append(name)
        names.append(name)
    quantized = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    if not any(id(p) not in quantized and p.is_floating_point() for p in model.parameters()):
        # FlowModel reads its input dtype from the first parameter: keep the output layer in
        # float (it is small, and a float head is the usual choice for accuracy).
        if linear_names:
            keep = linear_names[-1]
            names.remove(keep)
            log.debug("int8: keeping the output layer %s in float", keep)
    return names


def _disable_transformer_fastpath(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's fused inference path reads ``linear1.weight`` as a tensor,
    which a dynamically quantized Linear does not have; send those layers down the regular
    path (the one training uses), which calls the quantized modules."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and (
            type(mod.linear1) is not nn.Linear or type(mod.linear2) is not nn.Linear
        ):
            mod.activation_relu_or_gelu = 0  # only consulted by the fast-path check


def quantize_dynamic_int8(model: nn.Module, *, min_weights: int = MIN_QUANTIZED_WEIGHTS) -> nn.Module:
    """An int8 dynamically quantized copy (CPU, eval mode) of ``model``; the original is untouched.

    Every ``nn.Linear``, ``nn.LSTM`` and ``nn.GRU`` gets int8 weights with activations
    quantized on the fly (``torch.ao.quantization.quantize_dynamic``), except layers with fewer
    than ``min_weights`` weights, a Linear whose weight is tied to an embedding (LM heads)
    and, when every other parameter would be
    quantized, the output layer (so the model keeps a float parameter that sets its input
    dtype). Attention projections inside ``nn.MultiheadAttention`` stay float (PyTorch does not
    dynamically quantize them); transformer layers run the regular (non-fused) path.
    Convolutions and embeddings stay float, so a CNN gains only on its dense layers: measure with
    :func:`model_size_bytes`.
    """
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise InferenceError(f"this torch build has no dynamic quantization: {e}") from None
    src = _unwrap_model(model)
    q = copy.deepcopy(src).cpu().eval()
    names = _quantize_names(q, int(min_weights))
    if not names:
        log.info("int8: %s has no Linear/LSTM/GRU layer to quantize; returning a float copy",
                 type(src).__name__)
        return q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        q = quantize_dynamic(q, {n: default_dynamic_qconfig for n in names},
                             dtype=torch.qint8, inplace=True)
    _disable_transformer_fastpath(q)
    log.info("int8: quantized %d modules of %s", len(names), type(src).__name__)
    return q


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (what a checkpoint of it takes)."""
    buf = io.BytesIO()
    torch.save(_unwrap_model(model).state_dict(), buf)
    return buf.tell()


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _one_example(trained: TrainedLike, example: Any) -> list[str] | np.ndarray:
    x, _ = parse_inputs(example, trained.task, trained.label_names)
    return x[:1]


def latency_profile(trained: TrainedLike, example: Any, runs: int = 50, *, local: bool = False,
                    model: nn.Module | None = None, warmup: int | None = None) -> dict[str, Any]:
    """Single-example latency of the serving path (tokenise/convert, forward, softmax) in ms.

    ``example`` is anything :func:`parse_inputs` accepts; its first example is used. After
    ``warmup`` untimed runs (default ``max(3, runs // 10)``), ``runs`` timed runs with
    ``time.perf_counter``. Returns p50/p95/p99 (linear-interpolated percentiles), mean, min,
    max in milliseconds and the counts.
    """
    _check_servable(trained)
    runs = int(runs)
    if runs < 1:
        raise InferenceError(f"runs must be at least 1, got {runs}")
    net = _pick_model(trained, local, model)
    x = _one_example(trained, example)
    warm = max(3, runs // 10) if warmup is None else max(0, int(warmup))
    for _ in range(warm):
        _forward_proba(trained, net, x, 1)
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter()
        _forward_proba(trained, net, x, 1)
        times[i] = time.perf_counter() - t0
    ms = times * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "runs": runs,
        "warmup_runs": warm,
        "torch_threads": torch.get_num_threads(),
    }


def throughput(trained: TrainedLike, batch: Any, seconds: float = 1.0, *, local: bool = False,
               model: nn.Module | None = None, batch_size: int = 256) -> float:
    """Samples per second of the serving path on ``batch``, repeated for about ``seconds``
    (at least one pass, after one untimed warm-up pass)."""
    _check_servable(trained)
    if not seconds > 0 or not math.isfinite(seconds):
        raise InferenceError(f"seconds must be a positive number, got {seconds}")
    net = _pick_model(trained, local, model)
    x, _ = parse_inputs(batch, trained.task, trained.label_names)
    _forward_proba(trained, net, x, batch_size)
    done = 0
    t0 = time.perf_counter()
    while True:
        _forward_proba(trained, net, x, batch_size)
        done += len(x)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return done / elapsed
