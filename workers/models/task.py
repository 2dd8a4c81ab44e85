"""What a model is built for (:class:`TaskInfo`), and which architectures fit which data.

Architectures: ``mlp``, ``cnn``, ``rnn`` and ``transformer`` are implemented for the kinds in
:data:`SUPPORTED`; ``gnn`` and ``hybrid`` are not implemented and always raise
:class:`ModelError` with the alternatives. Cheap: nothing here builds a torch module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

PAD_ID = 0
"""Token id used for padding in ``text`` batches (masked out of attention and pooling)."""

ARCHITECTURES: tuple[str, ...] = ("transformer", "cnn", "rnn", "mlp", "gnn", "hybrid")
TASK_KINDS: tuple[str, ...] = ("vectors", "images", "text", "lm")

SUPPORTED: dict[str, tuple[str, ...]] = {
    "transformer": ("vectors", "images", "text", "lm"),
    "rnn": ("vectors", "images", "text", "lm"),
    "cnn": ("vectors", "images", "text"),
    "mlp": ("vectors", "images", "text"),
    "gnn": (),
    "hybrid": (),
}
"""architecture -> dataset kinds it can be built for."""

_KIND_WORDS = {
    "vectors": "feature vectors",
    "images": "images",
    "text": "text classification",
    "lm": "language modelling",
}

DEFAULT_MAX_LEN = 512
"""Positional table size used when a text/lm task does not say its ``max_len``."""


class ModelError(ValueError):
    """A model cannot be built as asked; the message says what is wrong and what to do."""


@dataclass
class TaskInfo:
    """What the data looks like, as the data module reports it."""

    kind: Literal["vectors", "images", "text", "lm"]
    input_shape: tuple[int, ...]  # (d,) vectors, (C,H,W) images, () text/lm
    num_classes: int  # for lm: = vocab_size
    vocab_size: int = 0  # text / lm
    max_len: int = 0  # text / lm sequence length


def _alternatives(kind: str) -> str:
    names = [a for a in ("transformer", "cnn", "rnn", "mlp") if kind in SUPPORTED[a]]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_compatible(architecture: str, task_kind: str) -> None:
    """Raise :class:`ModelError` if ``architecture`` cannot be built for ``task_kind``.

    Cheap (no torch module is built): call it when a job is submitted.
    """
    if architecture not in SUPPORTED:
        raise ModelError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    if task_kind not in TASK_KINDS:
        raise ModelError(
            f"unknown dataset kind {task_kind!r}; expected one of {', '.join(TASK_KINDS)}"
        )
    if task_kind in SUPPORTED[architecture]:
        return
    what = _KIND_WORDS[task_kind]
    use = _alternatives(task_kind)
    if architecture == "gnn":
        why = ("graph neural networks need a graph (node features plus edges) and this "
               "server has no graph datasets; a GNN is not implemented here")
    elif architecture == "hybrid":
        why = "the hybrid architecture is not implemented in this server"
    else:
        why = (f"{architecture} has no causal next-token model here; language modelling needs "
               "a sequence model that only looks at earlier tokens")
    raise ModelError(
        f"architecture {architecture!r} is not supported for dataset kind {task_kind!r} "
        f"({what}): {why}; use {use} instead"
    )


def validate_task(task: TaskInfo) -> None:
    """Raise :class:`ModelError` when ``task`` is inconsistent (shape, vocabulary, classes)."""
    if task.kind not in TASK_KINDS:
        raise ModelError(f"unknown dataset kind {task.kind!r}; expected one of {', '.join(TASK_KINDS)}")
    shape = tuple(task.input_shape)
    if task.kind == "vectors":
        if len(shape) != 1 or shape[0] < 1:
            raise ModelError(f"vector data needs input_shape (d,) with d >= 1, got {shape}")
    elif task.kind == "images":
        if len(shape) != 3 or min(shape) < 1:
            raise ModelError(f"image data needs input_shape (C, H, W), got {shape}")
    else:
        if task.vocab_size < 2:
            raise ModelError(f"{task.kind} data needs vocab_size >= 2, got {task.vocab_size}")
        if task.max_len < 0:
            raise ModelError(f"max_len must be >= 0, got {task.max_len}")
    if task.kind == "lm":
        if task.num_classes not in (0, task.vocab_size):
            raise ModelError(
                f"for language modelling num_classes must equal vocab_size "
                f"({task.vocab_size}), got {task.num_classes}"
            )
    elif task.num_classes < 2:
        raise ModelError(f"classification needs at least 2 classes, got num_classes={task.num_classes}")


def out_classes(task: TaskInfo) -> int:
    """Width of the output layer: the vocabulary for lm, else the classes."""
    return task.vocab_size if task.kind == "lm" else task.num_classes


def task_max_len(task: TaskInfo) -> int:
    """Positional table size: the task's ``max_len``, or ``DEFAULT_MAX_LEN`` with a warning."""
    if task.max_len > 0:
        return task.max_len
    log.warning("%s task has no max_len; using %d positions", task.kind, DEFAULT_MAX_LEN)
    return DEFAULT_MAX_LEN
