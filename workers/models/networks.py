"""The preset networks: MLP, CNN, RNN and transformer, each for the dataset kinds it supports."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import FlowModel
from .blocks import (
    EncoderStack,
    ceil_sqrt,
    checkpointed,
    group_norm,
    images_as_rows,
    init_embedding,
    masked_max,
    masked_mean,
    packed_lengths,
    rnn_cls,
    run_rnn,
    text_mask,
    vector_square,
)
from .task import PAD_ID, ModelError, TaskInfo, task_max_len

log = logging.getLogger(__name__)


class _DenseBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int, activation: nn.Module, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.act = activation
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.linear(x)))


class MLPNet(FlowModel):
    """Fully connected net; images are flattened, text is a masked mean of token embeddings."""

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        super().__init__("mlp", preset, task, cfg)
        if task.kind == "text":
            self.embedding = nn.Embedding(task.vocab_size, cfg["embedding_dim"], padding_idx=PAD_ID)
            init_embedding(self.embedding)
            d = cfg["embedding_dim"]
        else:
            self.embedding = None
            d = math.prod(task.input_shape)
        blocks = []
        for width in cfg["hidden"]:
            blocks.append(_DenseBlock(d, width, nn.ReLU(), cfg["dropout"]))
            d = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(d, task.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            ids = self._token_input(x)
            h = masked_mean(self.embedding(ids), text_mask(ids))
        else:
            h = self._float_input(x).flatten(1)
        use = self._ckpt()
        for block in self.blocks:
            h = checkpointed(use, block, h)
        return self.head(h)


class _ConvBlock(nn.Module):
    """``convs`` 3x3 convolutions (padding 1: the size is kept), each GroupNorm + ReLU, then a max-pool."""

    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int] | None, convs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), group_norm(c_out), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.MaxPool2d(pool) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.convs(x))


class _TextConv(nn.Module):
    def __init__(self, d_in: int, filters: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_in, filters, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, E, L) -> (B, F)
        return F.relu(self.conv(x)).amax(dim=2)


class CNNNet(FlowModel):
    """Images (and vectors zero-padded to a square grid): conv-pool blocks whose feature maps are
    flattened, spatial layout kept, into a dense ReLU layer and the classifier (the textbook
    conv32-pool-conv64-pool-dense128 net for ``base``); text: a TextCNN (max over time)."""

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        super().__init__("cnn", preset, task, cfg)
        self.side = 0
        self.embedding: nn.Embedding | None = None
        self.grid: nn.Module = nn.Identity()
        self.dense: nn.Module = nn.Identity()
        if task.kind == "text":
            e = cfg["embedding_dim"]
            self.embedding = nn.Embedding(task.vocab_size, e, padding_idx=PAD_ID)
            init_embedding(self.embedding)
            self.kernel_sizes = tuple(cfg["kernel_sizes"])
            self.blocks = nn.ModuleList(_TextConv(e, cfg["filters"], k) for k in self.kernel_sizes)
            d = cfg["filters"] * len(self.kernel_sizes)
        else:
            d = self._build_image_path(task, cfg)
        self.drop = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(d, task.num_classes)

    def _build_image_path(self, task: TaskInfo, cfg: dict[str, Any]) -> int:
        """The conv-pool blocks (a 2x2 max-pool after each while a side is >= 2 px), an adaptive
        average pool to at most ``max_grid`` per side (large images), and the dense layer; returns
        the classifier's input width."""
        if task.kind == "vectors":
            dim = task.input_shape[0]
            self.side = ceil_sqrt(dim)
            if self.side * self.side != dim:
                log.info("cnn: %d features zero-padded to a %dx%d grid", dim, self.side, self.side)
            c, h, w = 1, self.side, self.side
        else:
            c, h, w = task.input_shape
        blocks = []
        for width in cfg["channels"]:
            pool = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
            blocks.append(_ConvBlock(c, width, None if pool == (1, 1) else pool, cfg["convs_per_block"]))
            h, w, c = h // pool[0], w // pool[1], width
        self.blocks = nn.ModuleList(blocks)
        cap = cfg["max_grid"]
        if h > cap or w > cap:
            h, w = min(h, cap), min(w, cap)
            self.grid = nn.AdaptiveAvgPool2d((h, w))
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, cfg["hidden"]), nn.ReLU())
        return cfg["hidden"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use = self._ckpt()
        if self.embedding is not None:
            ids = self._token_input(x)
            shortest = max(self.kernel_sizes)
            if ids.shape[1] < shortest:
                ids = F.pad(ids, (0, shortest - ids.shape[1]), value=PAD_ID)
            e = self.embedding(ids).transpose(1, 2)
            h = torch.cat([checkpointed(use, conv, e) for conv in self.blocks], dim=1)
        else:
            x = self._float_input(x)
            if self.side:
                x = vector_square(x, self.side).unsqueeze(1)
            for block in self.blocks:
                x = checkpointed(use, block, x)
            h = checkpointed(use, self.dense, self.grid(x))
        return self.head(self.drop(h))


class RNNNet(FlowModel):
    """Bidirectional LSTM classifier (text tokens, image rows, vector rows) or an LSTM LM."""

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        super().__init__("rnn", preset, task, cfg)
        hidden, layers = cfg["hidden_size"], cfg["num_layers"]
        self.is_lm = task.kind == "lm"
        self.side = 0
        self.embedding: nn.Embedding | None = None
        if task.kind in ("text", "lm"):
            e = cfg["embedding_dim"]
            self.embedding = nn.Embedding(task.vocab_size, e,
                                          padding_idx=PAD_ID if task.kind == "text" else None)
            init_embedding(self.embedding)
            d_in = e
        elif task.kind == "vectors":
            self.side = ceil_sqrt(task.input_shape[0])
            d_in = self.side
        else:
            c, _, w = task.input_shape
            d_in = c * w
        bidirectional = not self.is_lm
        self.rnn = rnn_cls(cfg["cell"])(
            d_in, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
            dropout=cfg["dropout"] if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(cfg["dropout"])
        if self.is_lm:
            self.head = nn.Linear(hidden, task.vocab_size)
            if self.embedding is not None and self.embedding.embedding_dim == hidden:
                self.head.weight = self.embedding.weight
        else:
            self.head = nn.Linear(2 * 2 * hidden, task.num_classes)  # mean + max of both directions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = lengths = None
        if self.embedding is not None:
            ids = self._token_input(x)
            seq = self.embedding(ids)
            if not self.is_lm:
                mask = text_mask(ids)
                lengths = packed_lengths(mask)
        else:
            x = self._float_input(x)
            seq = vector_square(x, self.side) if self.side else images_as_rows(x)
        out = checkpointed(self._ckpt(), run_rnn, self.rnn, seq, lengths)
        if self.is_lm:
            return self.head(self.drop(out))
        h = torch.cat([masked_mean(out, mask), masked_max(out, mask)], dim=1)
        return self.head(self.drop(h))


class TransformerNet(FlowModel):
    """Pre-norm transformer encoder.

    text: token + learned positional embedding, padding-masked attention, masked mean pool.
    (Language models are the ``transformers`` GPT-2 of :mod:`.gpt`.)
    vectors: the vector cut into ceil(sqrt(d)) chunks, each a token; images: ViT patches.
    """

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        super().__init__("transformer", preset, task, cfg)
        d = cfg["d_model"]
        if d % cfg["num_heads"]:
            raise ModelError(f"d_model {d} is not divisible by num_heads {cfg['num_heads']}")
        kind = task.kind
        self.embedding: nn.Embedding | None = None
        self.patch: nn.Module | None = None
        self.chunk = 0
        self.patch_size = 0
        if kind == "lm":
            raise ModelError("language models are built by workers.models.gpt (GPTLanguageModel)")
        if kind == "text":
            self.embedding = nn.Embedding(task.vocab_size, d, padding_idx=PAD_ID)
            init_embedding(self.embedding)
            n_pos = task_max_len(task)
        elif kind == "vectors":
            dim = task.input_shape[0]
            self.chunk = ceil_sqrt(dim)
            n_pos = -(-dim // self.chunk)
            self.patch = nn.Linear(self.chunk, d)
        else:
            c, h, w = task.input_shape
            self.patch_size = max(1, math.ceil(math.sqrt(h * w / 64)))
            p = self.patch_size
            n_pos = -(-h // p) * -(-w // p)
            self.patch = nn.Conv2d(c, d, p, stride=p)
        self.n_pos = n_pos
        self.pos_embedding = nn.Parameter(torch.zeros(1, n_pos, d))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.drop = nn.Dropout(cfg["dropout"])
        self.encoder = EncoderStack(d, cfg["num_heads"], cfg["ffn_dim"], cfg["num_layers"], cfg["dropout"],
                                    causal=False)
        self.head = nn.Linear(d, task.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.embedding is not None:
            ids = self._token_input(x, self.n_pos)
            h = self.embedding(ids)
            mask = text_mask(ids)
        else:
            x = self._float_input(x)
            if self.chunk:
                b, dim = x.shape
                n = self.n_pos * self.chunk
                if n != dim:
                    x = F.pad(x, (0, n - dim))
                h = self.patch(x.reshape(b, self.n_pos, self.chunk))
            else:
                p = self.patch_size
                hh, ww = x.shape[2], x.shape[3]
                x = F.pad(x, (0, (-ww) % p, 0, (-hh) % p))
                h = self.patch(x).flatten(2).transpose(1, 2)
        h = self.drop(h + self.pos_embedding[:, : h.shape[1]])
        h = self.encoder(h, mask, self._ckpt())
        return self.head(masked_mean(h, mask))
