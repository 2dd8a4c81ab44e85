"""Pieces shared by the training modes: the result type, optimizers, batches, loss, evaluation
and the layout of the metric sums that ranks all-reduce."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from workers.data import Tokenizer
from workers.devices import autocast
from workers.metrics import macro_f1
from workers.models import PAD_ID, TaskInfo

log = logging.getLogger(__name__)

EVAL_BATCH = 256
"""Examples per evaluation batch (LM: windows per batch is LM_EVAL_BATCH)."""
LM_EVAL_BATCH = 32


def eval_batch_size(kind: str, seq_len: int = 0) -> int:
    """Examples per evaluation batch; long texts get fewer, to bound attention / activation memory."""
    if kind == "lm":
        return LM_EVAL_BATCH
    if kind == "text":
        return max(16, min(EVAL_BATCH, 8192 // max(1, seq_len)))
    return EVAL_BATCH


class TrainingError(RuntimeError):
    """A training job cannot run or failed; the message is shown to the user as is."""


@dataclass
class TrainedModel:
    """The model a node holds after training, with what inference needs to use it.

    ``local_model`` is set on federated workers: their own model after the last local
    training, before the global model replaced it (an ensemble of them can be used later).
    """

    model: nn.Module
    task: TaskInfo
    tokenizer: Tokenizer | None
    label_names: list[str]
    architecture: str
    preset: str
    max_len: int
    local_model: nn.Module | None = None
    session_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    epoch: int = 0


# --------------------------------------------------------------------------- process facts


def rss_mb() -> float:
    """Resident set size of this process in MiB, read now."""
    return psutil.Process().memory_info().rss / 2**20


# --------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """adam | sgd (momentum 0.9) | rmsprop | adagrad at learning rate ``lr``."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    raise TrainingError(f"unknown optimizer {name!r}; use adam, sgd, rmsprop or adagrad")


def set_lr(opt: torch.optim.Optimizer | None, lr: float) -> None:
    if opt is not None:
        for g in opt.param_groups:
            g["lr"] = lr


def try_load_optimizer(opt: torch.optim.Optimizer, state: Any, where: str) -> bool:
    """Restore an optimizer state when it fits; a mismatch is logged, not fatal."""
    if not state:
        return False
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        log.warning("%s: optimizer state in the checkpoint does not fit (%s); starting it fresh", where, exc)
        return False
    return True


def grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    """Total L2 norm of the gradients (before clipping); clips to ``clip`` when given."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(grads, clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


# --------------------------------------------------------------------------- flat weights


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every floating tensor of the model's state, each once (tied weights counted once)."""
    return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]


def flat_weights(model: nn.Module) -> torch.Tensor:
    """The model's floating state as one float32 vector (what federated modes exchange)."""
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).float() for t in _tensors(model)])


def set_weights(model: nn.Module, flat: torch.Tensor) -> None:
    """Load a vector made by :func:`flat_weights` back into the model."""
    with torch.no_grad():
        off = 0
        for t in _tensors(model):
            k = t.numel()
            t.copy_(flat[off : off + k].view_as(t))
            off += k


# --------------------------------------------------------------------------- data


@dataclass
class Split:
    """Encoded examples: float features / images or int64 token ids (``X``), int64 labels or
    next-token targets (``y``)."""

    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.X.shape[0])


def epoch_order(n: int, seed: int, epoch: int, salt: int) -> np.ndarray:
    """The order this rank visits its ``n`` examples in ``epoch`` (seeded by seed, epoch, salt)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(salt)]).permutation(n)


def batch_loss(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, kind: str, amp: bool
) -> tuple[torch.Tensor, int, int, int]:
    """(mean loss, correct predictions, predictions counted, tokens) for one batch.

    Classification counts examples; language modelling counts predicted tokens and no correct
    ones: a training token accuracy would take an arg-max over batch x 128 x vocabulary logits
    every step (about 4% of a ``base`` GPT-2 step), so language models report validation accuracy
    and perplexity only.
    """
    with autocast(amp, xb.device):
        out = model(xb)
    out = out.float()
    if kind == "lm":
        target = yb.reshape(-1)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target)
        n = int(target.numel())
        return loss, 0, n, n
    loss = F.cross_entropy(out, yb)
    with torch.no_grad():
        correct = int((out.argmax(dim=1) == yb).sum())
    tokens = int((xb != PAD_ID).sum()) if kind == "text" else 0
    return loss, correct, int(yb.shape[0]), tokens


# --------------------------------------------------------------------------- metric sums

TRAIN_FIELDS = ("loss_sum", "correct", "count", "samples", "tokens", "gnorm_sum", "gnorm_n")
VAL_FIELDS = ("val_loss_sum", "val_correct", "val_count")


class Sums:
    """Additive training / validation sums of one rank, laid out as one float64 vector so one
    all_reduce(SUM) gives the global figures. ``flag`` carries the stop request (any > 0)."""

    def __init__(self, num_classes: int) -> None:
        self.c = int(num_classes)
        self.train = dict.fromkeys(TRAIN_FIELDS, 0.0)
        self.val = dict.fromkeys(VAL_FIELDS, 0.0)
        self.flag = 0.0
        self.tp = np.zeros(self.c)
        self.fp = np.zeros(self.c)
        self.fn = np.zeros(self.c)

    def add_train(self, loss_mean: float, correct: int, count: int, samples: int, tokens: int) -> None:
        t = self.train
        t["loss_sum"] += loss_mean * count
        t["correct"] += correct
        t["count"] += count
        t["samples"] += samples
        t["tokens"] += tokens

    def add_gnorm(self, value: float) -> None:
        self.train["gnorm_sum"] += value
        self.train["gnorm_n"] += 1

    def set_val(self, ev: dict[str, Any]) -> None:
        self.val = {"val_loss_sum": ev["loss_sum"], "val_correct": ev["correct"], "val_count": ev["count"]}
        if self.c:
            self.tp, self.fp, self.fn = ev["tp"], ev["fp"], ev["fn"]

    def tensor(self) -> torch.Tensor:
        head = [self.train[k] for k in TRAIN_FIELDS] + [self.val[k] for k in VAL_FIELDS] + [self.flag]
        return torch.from_numpy(np.concatenate([np.asarray(head, dtype=np.float64), self.tp, self.fp, self.fn]))

    @classmethod
    def from_tensor(cls, t: torch.Tensor, num_classes: int) -> Sums:
        v = t.double().numpy()
        s = cls(num_classes)
        nt, nv = len(TRAIN_FIELDS), len(VAL_FIELDS)
        s.train = {k: float(v[i]) for i, k in enumerate(TRAIN_FIELDS)}
        s.val = {k: float(v[nt + i]) for i, k in enumerate(VAL_FIELDS)}
        s.flag = float(v[nt + nv])
        o = nt + nv + 1
        c = s.c
        s.tp, s.fp, s.fn = v[o : o + c].copy(), v[o + c : o + 2 * c].copy(), v[o + 2 * c : o + 3 * c].copy()
        return s

    def metrics(self, kind: str) -> dict[str, float]:
        """Global metrics from summed figures: loss, accuracy, val_*, grad_norm."""
        out: dict[str, float] = {}
        t, v = self.train, self.val
        if t["count"] > 0:
            out["loss"] = t["loss_sum"] / t["count"]
            if kind != "lm":  # batch_loss counts no correct tokens in training
                out["accuracy"] = t["correct"] / t["count"]
        if t["gnorm_n"] > 0:
            out["grad_norm"] = t["gnorm_sum"] / t["gnorm_n"]
        if v["val_count"] > 0:
            out["val_loss"] = v["val_loss_sum"] / v["val_count"]
            out["val_accuracy"] = v["val_correct"] / v["val_count"]
            if kind == "lm":
                out["val_perplexity"] = float(math.exp(min(out["val_loss"], 700.0)))
            elif self.c:
                out["val_f1_macro"] = macro_f1(self.tp, self.fp, self.fn)
        return out


# --------------------------------------------------------------------------- evaluation


def iter_batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split | None, kind: str, num_classes: int) -> dict[str, Any]:
    """Validation sums on this rank's part: loss sum, correct, count, per-class TP/FP/FN."""
    c = num_classes if kind != "lm" else 0
    out: dict[str, Any] = {
        "loss_sum": 0.0, "correct": 0.0, "count": 0.0,
        "tp": np.zeros(c), "fp": np.zeros(c), "fn": np.zeros(c),
    }
    if split is None or len(split) == 0:
        return out
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device  # cuda in synchronous training on nccl
    model.eval()
    size = eval_batch_size(kind, int(split.X.shape[1]) if kind == "text" else 0)
    try:
        for sl in iter_batches(len(split), size):
            xb, yb = split.X[sl], split.y[sl]
            logits = model(xb.to(device)).float().cpu()
            if kind == "lm":
                flat = logits.reshape(-1, logits.shape[-1])
                target = yb.reshape(-1)
                out["loss_sum"] += float(F.cross_entropy(flat, target, reduction="sum"))
                out["correct"] += float((flat.argmax(1) == target).sum())
                out["count"] += float(target.numel())
            else:
                out["loss_sum"] += float(F.cross_entropy(logits, yb, reduction="sum"))
                pred = logits.argmax(1)
                hit = pred == yb
                out["correct"] += float(hit.sum())
                out["count"] += float(yb.numel())
                out["tp"] += np.bincount(yb[hit].numpy(), minlength=c)[:c]
                out["fp"] += np.bincount(pred[~hit].numpy(), minlength=c)[:c]
                out["fn"] += np.bincount(yb[~hit].numpy(), minlength=c)[:c]
    finally:
        model.train(was_training)
    return out
