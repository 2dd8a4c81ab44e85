"""The base class of every model built here, and the rules all of them keep for the trainer:

* No BatchNorm anywhere (GroupNorm / LayerNorm instead): a model's ``state_dict`` holds only
  parameters, so FedAvg / all-reduce of the state needs no buffer handling, and gradient
  checkpointing's recomputation cannot double-update running statistics.
* Every parameter takes part in every forward pass (no ``find_unused_parameters`` needed).
* ``model.gradient_checkpointing`` (bool) can be flipped after building; it only acts in
  training mode with grad enabled, using ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
  which preserves the RNG state, so outputs and gradients are identical to running without it.
* The GPT-2 language model ties its output projection to the token embedding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .task import TaskInfo


class FlowModel(nn.Module):
    """Base of every model built here: remembers what it is and handles input checks."""

    def __init__(self, architecture: str, preset: str, task: TaskInfo, config: dict[str, Any]) -> None:
        super().__init__()
        self.architecture = architecture
        self.preset = preset
        self.task = task
        self.config = dict(config)
        self.gradient_checkpointing = False

    def _ckpt(self) -> bool:
        return bool(self.gradient_checkpointing and self.training and torch.is_grad_enabled())

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(self.task.input_shape)
        n = math.prod(shape)
        if x.dim() < 1 or x.shape[0] == 0 or x[0].numel() != n:
            raise ValueError(
                f"{self.architecture} model for {self.task.kind} expects a batch of samples with "
                f"shape {shape} ({n} values each), got a tensor of shape {tuple(x.shape)}"
            )
        x = x.reshape(x.shape[0], *shape)
        dtype = next(self.parameters()).dtype
        return x if x.dtype == dtype else x.to(dtype)

    def _token_input(self, ids: torch.Tensor, max_positions: int = 0) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(
                f"{self.architecture} model for {self.task.kind} expects token ids of shape "
                f"(batch, seq_len), got {tuple(ids.shape)}"
            )
        if ids.dtype != torch.long:
            ids = ids.long()
        if max_positions and ids.shape[1] > max_positions:
            raise ValueError(
                f"sequence length {ids.shape[1]} exceeds the model's max_len {max_positions}; "
                "truncate batches to max_len"
            )
        if ids.numel() and not ids.is_meta and (int(ids.min()) < 0 or int(ids.max()) >= self.task.vocab_size):
            raise ValueError(
                f"token id out of range [0, {self.task.vocab_size}): min {int(ids.min())}, "
                f"max {int(ids.max())}; the tokenizer and the model disagree on vocab_size"
            )
        return ids
