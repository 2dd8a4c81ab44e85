"""How much memory training a job's model takes on one node, estimated before the session starts.

The model is built on torch's meta device (shapes only, no storage) and run once on a one-example
shape-only batch, so a model of any size is measured without the node growing: a job far over a
node's budget is refused before anything is allocated. The figure is an estimate, in MiB, of
what training adds to the node process (the server compares it with the node's ``memory_mb``):

* model state: float32 weights, gradients, the optimizer's state (Adam keeps two tensors per
  parameter, the others one), COMMUNICATION_COPIES (the gradient all-reduce / FedAvg buffers)
  and the copy of weights and optimizer state a checkpoint is written from (every session writes
  one at its end). Measured: a 16.3 M-parameter MLP with Adam peaked 570 MB over the node's
  start, 8.7 copies of its weights; this counts 9;
* activations: what one training batch keeps for backward (every tensor the forward pass
  creates, times batch_size), or an evaluation batch's largest tensors, whichever is more.

Not counted: the node's own runtime (Python, torch: the node reports it apart), the dataset and
torch's allocator cache (the server's RSS limit leaves room for them), and the savings of
gradient_checkpointing / mixed_precision (there it is an upper bound).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from workers import protocol as p
from workers.models import TaskInfo, build_model

MB = 2**20
FLOAT_BYTES = 4
OPTIMIZER_SLOTS = {"adam": 2, "sgd": 1, "rmsprop": 1, "adagrad": 1}  # state tensors per parameter
COMMUNICATION_COPIES = 2
PROBE_MAX_LEN = 64  # sequence positions of the shape-only probe (an LSTM runs step by step on meta)
EVAL_LIVE_TENSORS = 3  # an evaluation step holds a layer's input, output and one temporary at once
LENGTH_SAMPLE = 5000  # texts tokenized to guess the sequence length the trainer will choose


@dataclass
class MemoryEstimate:
    parameters: int
    model_state_mb: float
    activations_mb: float

    @property
    def train_mb(self) -> float:
        return self.model_state_mb + self.activations_mb


def estimate_training_memory(job: p.TrainJob, ds: Any) -> MemoryEstimate:
    """Estimate for training ``job``'s model on dataset ``ds`` (a workers.data.Dataset) on this node.

    Raises workers.models.ModelError when the model cannot be built for this data."""
    from pathlib import Path

    from workers.training.checkpoint import recorded_hf_config
    from workers.training.common import eval_batch_size

    task = probe_task(ds, job)
    # a resumed language model keeps the shape its source records (workers.training.engine)
    hf_config = recorded_hf_config(Path(job.resume_from)) if job.resume_from and task.kind == "lm" else None
    if hf_config is not None:  # its vocabulary; windows no longer than its context
        vocab = int(hf_config.get("vocab_size") or task.vocab_size)
        task = TaskInfo("lm", (), vocab, vocab, min(task.max_len, int(hf_config.get("n_positions") or task.max_len)))
    with torch.device("meta"):
        model = build_model(job.architecture, job.model, task, layers=job.layers or None, hf_config=hf_config)
    parameters = sum(t.numel() for t in model.parameters())
    slots = OPTIMIZER_SLOTS.get(job.optimizer, 2)
    copies = 2 + slots + COMMUNICATION_COPIES + (1 + slots)  # the last: the checkpoint's copy
    state = parameters * FLOAT_BYTES * copies
    per_example, largest = forward_bytes(model, task)
    train = job.batch_size * per_example
    evaluation = eval_batch_size(task.kind, task.max_len) * EVAL_LIVE_TENSORS * largest
    return MemoryEstimate(parameters, state / MB, max(train, evaluation) / MB)


def probe_task(ds: Any, job: Any = None) -> TaskInfo:
    """The TaskInfo the trainer will build for ``ds``, vocabulary at its upper bound (the real one
    is agreed across workers once training starts)."""
    from workers.data import tokenize
    from workers.models.gpt import requested_vocab_size
    from workers.training.setup import LM_SEQ_LEN, VOCAB_SIZE, choose_max_len

    if ds.kind == "lm":  # the BPE vocabulary asked for (the trained one is at most that)
        vocab = requested_vocab_size(job.model, job.layers) if job is not None else requested_vocab_size("base", None)
        return TaskInfo("lm", (), vocab, vocab, LM_SEQ_LEN)
    if ds.kind == "text":
        lengths = Counter(len(tokenize(text)) for text in ds.X[:LENGTH_SAMPLE])
        return TaskInfo("text", (), max(2, ds.num_classes), VOCAB_SIZE, choose_max_len(lengths))
    return TaskInfo(ds.kind, tuple(ds.input_shape), max(2, ds.num_classes))


class _CountNewTensors(TorchDispatchMode):
    """Adds up the bytes of every new tensor an op returns (views and in-place results share
    memory that is already counted)."""

    def __init__(self, probe_len: int, real_len: int) -> None:
        super().__init__()
        self.probe_len, self.real_len = probe_len, real_len
        self.total = self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size() * self._length_scale(t)
                self.total += size
                self.largest = max(self.largest, size)
        return out

    def _length_scale(self, t: torch.Tensor) -> float:
        """The probe ran on probe_len positions: an attention map (a (len, len) tail) grows with
        the square of the real length, anything else linearly."""
        if self.probe_len == self.real_len:
            return 1.0
        ratio = self.real_len / self.probe_len
        return ratio * ratio if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.probe_len else ratio


def forward_bytes(model: torch.nn.Module, task: TaskInfo) -> tuple[float, float]:
    """(bytes every tensor of one example's training forward pass takes, bytes of its largest
    tensor), from a shape-only forward pass of the meta-device ``model``."""
    if task.kind in ("text", "lm"):
        probe_len = min(task.max_len, PROBE_MAX_LEN)
        batch = torch.ones(1, probe_len, dtype=torch.long, device="meta")
    else:
        probe_len = 0
        batch = torch.zeros(1, *task.input_shape, device="meta")
    model.train()
    with torch.enable_grad(), _CountNewTensors(probe_len, task.max_len if probe_len else 0) as count:
        model(batch)
    return count.total, count.largest
