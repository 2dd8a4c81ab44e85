"""The stages a custom model is made of, and the model that runs them in order."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FlowModel
from .blocks import (
    EncoderStack,
    checkpointed,
    images_as_rows,
    init_embedding,
    masked_mean,
    packed_lengths,
    run_rnn,
    text_mask,
    vector_square,
)
from .task import PAD_ID, TaskInfo


class Stage(nn.Module):
    """One step of a custom model: ``forward(x, mask, use_ckpt)``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, use_ckpt: bool) -> torch.Tensor:
        raise NotImplementedError


class EmbedStage(Stage):
    """Token embedding, plus a learned positional embedding when ``n_pos`` > 0."""

    def __init__(self, vocab: int, dim: int, n_pos: int, padding: bool, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD_ID if padding else None)
        init_embedding(self.embedding)
        self.n_pos = n_pos
        if n_pos:
            self.pos_embedding = nn.Parameter(torch.zeros(1, n_pos, dim))
            nn.init.normal_(self.pos_embedding, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, use_ckpt):
        h = self.embedding(x)
        if self.n_pos:
            h = h + self.pos_embedding[:, : h.shape[1]]
        return self.drop(h)


class EncoderStage(Stage):
    """A transformer encoder stack (padding-masked, or causal for lm)."""

    def __init__(self, stack: EncoderStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x, mask, use_ckpt):
        return self.stack(x, mask, use_ckpt)


class RecurrentStage(Stage):
    """An LSTM/GRU over the sequence, packed by the padding mask."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, mask, use_ckpt):
        lengths = packed_lengths(mask) if mask is not None else None
        return checkpointed(use_ckpt, run_rnn, self.rnn, x, lengths)


class ModuleStage(Stage):
    """Wraps a plain module; checkpointed when ``ckpt`` (dense / conv blocks)."""

    def __init__(self, module: nn.Module, ckpt: bool = False) -> None:
        super().__init__()
        self.module = module
        self.ckpt = ckpt

    def forward(self, x, mask, use_ckpt):
        return checkpointed(use_ckpt and self.ckpt, self.module, x)


class Reshape(Stage):
    """Parameter-free change of form between layers."""

    def __init__(self, how: str, side: int = 0) -> None:
        super().__init__()
        self.how = how
        self.side = side

    def forward(self, x, mask, use_ckpt):
        if self.how == "vector_to_image":
            return vector_square(x, self.side).unsqueeze(1)
        if self.how == "vector_to_seq":
            return vector_square(x, self.side)
        if self.how == "image_to_seq":
            return images_as_rows(x)
        if self.how == "flatten":
            return x.flatten(1)
        if self.how == "pool_seq":
            return masked_mean(x, mask)
        raise AssertionError(self.how)

    def extra_repr(self) -> str:
        return self.how


class CustomNet(FlowModel):
    """A model assembled from a Flow Nexus ``layers`` list (see :func:`build_custom`)."""

    def __init__(self, architecture: str, task: TaskInfo, stages: list[Stage],
                 config: dict[str, Any]) -> None:
        super().__init__(architecture, "custom", task, config)
        self.stages = nn.ModuleList(stages)
        self.n_pos = config.get("max_len", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.task.kind in ("text", "lm"):
            x = self._token_input(x, self.n_pos)
            if self.task.kind == "text":
                mask = text_mask(x)
        else:
            x = self._float_input(x)
        use = self._ckpt()
        for stage in self.stages:
            x = stage(x, mask, use)
        return x
