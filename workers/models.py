"""Model zoo for node training: real torch modules for every (architecture, dataset kind) pair.

``build_model(architecture, preset, task)`` returns an ``nn.Module`` that maps one batch to
logits:

* ``vectors``: float ``(B, d)`` -> ``(B, num_classes)``
* ``images``:  float ``(B, C, H, W)`` (any shape with ``C*H*W`` values per sample) -> ``(B, num_classes)``
* ``text``:    int64 token ids ``(B, L)``, PAD id 0, ``L <= max_len`` -> ``(B, num_classes)``
* ``lm``:      int64 token ids ``(B, L)``, ``L <= max_len`` -> next-token logits ``(B, L, vocab_size)``

Architectures: ``mlp``, ``cnn``, ``rnn`` and ``transformer`` are implemented for the kinds in
:data:`SUPPORTED`; ``gnn`` and ``hybrid`` are not implemented and always raise
:class:`ModelError` with the alternatives. Presets ``base`` < ``large`` < ``xl`` scale width and
depth (see the ``*_PRESETS`` tables); ``custom`` builds from a Flow Nexus ``layers`` list (see
:func:`build_custom`).

Design notes for the trainer:

* No BatchNorm anywhere (GroupNorm / LayerNorm instead): a model's ``state_dict`` holds only
  parameters, so FedAvg / all-reduce of the state needs no buffer handling, and gradient
  checkpointing's recomputation cannot double-update running statistics.
* Every parameter takes part in every forward pass (no ``find_unused_parameters`` needed).
* ``model.gradient_checkpointing`` (bool) can be flipped after building; it only acts in
  training mode with grad enabled, using ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
  which preserves the RNG state, so outputs and gradients are identical to running without it.
* The LM transformer ties its output projection to the token embedding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

PAD_ID = 0
"""Token id used for padding in ``text`` batches (masked out of attention and pooling)."""

ARCHITECTURES: tuple[str, ...] = ("transformer", "cnn", "rnn", "mlp", "gnn", "hybrid")
PRESETS: tuple[str, ...] = ("base", "large", "xl", "custom")
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

MLP_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"hidden": (128, 128), "embedding_dim": 64, "dropout": 0.1},
    "large": {"hidden": (512, 512, 512), "embedding_dim": 128, "dropout": 0.1},
    "xl": {"hidden": (1024, 1024, 1024, 1024), "embedding_dim": 256, "dropout": 0.1},
}
CNN_PRESETS: dict[str, dict[str, Any]] = {
    # channels: one conv block (3x3 conv, GroupNorm, ReLU, 2x2 max-pool while >= 2 px) each.
    # embedding_dim / filters / kernel_sizes: the TextCNN used for text.
    "base": {"channels": (32, 64), "embedding_dim": 64, "filters": 64,
             "kernel_sizes": (3, 4, 5), "dropout": 0.1},
    "large": {"channels": (64, 128, 256), "embedding_dim": 128, "filters": 128,
              "kernel_sizes": (2, 3, 4, 5), "dropout": 0.1},
    "xl": {"channels": (128, 256, 512, 512), "embedding_dim": 256, "filters": 256,
           "kernel_sizes": (2, 3, 4, 5, 6), "dropout": 0.1},
}
RNN_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"cell": "lstm", "embedding_dim": 64, "hidden_size": 64, "num_layers": 1, "dropout": 0.1},
    "large": {"cell": "lstm", "embedding_dim": 128, "hidden_size": 256, "num_layers": 2, "dropout": 0.1},
    "xl": {"cell": "lstm", "embedding_dim": 256, "hidden_size": 512, "num_layers": 3, "dropout": 0.1},
}
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"d_model": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 128, "dropout": 0.1},
    "large": {"d_model": 128, "num_layers": 4, "num_heads": 4, "ffn_dim": 512, "dropout": 0.1},
    "xl": {"d_model": 256, "num_layers": 6, "num_heads": 8, "ffn_dim": 1024, "dropout": 0.1},
}


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


# --------------------------------------------------------------------------- validation


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


def _validate_task(task: TaskInfo) -> None:
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


def _out_classes(task: TaskInfo) -> int:
    return task.vocab_size if task.kind == "lm" else task.num_classes


def _max_len(task: TaskInfo) -> int:
    if task.max_len > 0:
        return task.max_len
    log.warning("%s task has no max_len; using %d positions", task.kind, DEFAULT_MAX_LEN)
    return DEFAULT_MAX_LEN


# --------------------------------------------------------------------------- shared pieces


def _ceil_sqrt(n: int) -> int:
    return math.isqrt(n - 1) + 1 if n > 1 else 1


def _vector_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, d) -> (B, side, side), zero-padding the tail (64 features -> 8x8 exactly)."""
    pad = side * side - x.shape[1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], side, side)


def _images_as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, C*W): one sequence step per image row."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


def _text_mask(ids: torch.Tensor) -> torch.Tensor:
    """True at real tokens; a row made only of PAD keeps its first position."""
    mask = ids != PAD_ID
    empty = ~mask.any(dim=1)
    if not ids.is_meta and bool(empty.any()):  # meta (shape-only) tensors have no values to test
        mask = mask.clone()
        mask[:, 0] |= empty
    return mask


def _masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.mean(dim=1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _masked_max(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.amax(dim=1)
    return h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(dim=1)


def _lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Sequence lengths for packing: index of the last real token + 1 (CPU int64); None for a
    shape-only (meta) batch, which runs unpacked."""
    if mask.is_meta:
        return None
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (pos * mask).amax(dim=1).clamp(min=1).cpu()


def _run_rnn(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        return rnn(x)[0]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out


def _apply(use_ckpt: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if use_ckpt:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = 8 if channels % 8 == 0 else (4 if channels % 4 == 0 else 1)
    return nn.GroupNorm(groups, channels)


def _init_embedding(emb: nn.Embedding) -> None:
    nn.init.normal_(emb.weight, std=0.02)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].zero_()


class _EncoderStack(nn.Module):
    """Pre-norm transformer encoder layers plus a final LayerNorm; causal when asked."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, num_heads, ffn_dim, dropout, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                use_ckpt: bool = False) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.causal:
            length = x.shape[1]
            kwargs["src_mask"] = nn.Transformer.generate_square_subsequent_mask(
                length, device=x.device, dtype=x.dtype)
            kwargs["is_causal"] = True
        elif mask is not None:
            kwargs["src_key_padding_mask"] = ~mask
        for layer in self.layers:
            x = _apply(use_ckpt, layer, x, **kwargs)
        return self.norm(x)


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


# --------------------------------------------------------------------------- mlp


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
            _init_embedding(self.embedding)
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
            h = _masked_mean(self.embedding(ids), _text_mask(ids))
        else:
            h = self._float_input(x).flatten(1)
        use = self._ckpt()
        for block in self.blocks:
            h = _apply(use, block, h)
        return self.head(h)


# --------------------------------------------------------------------------- cnn


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int] | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = _group_norm(c_out)
        self.pool = nn.MaxPool2d(pool) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class _TextConv(nn.Module):
    def __init__(self, d_in: int, filters: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_in, filters, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, E, L) -> (B, F)
        return F.relu(self.conv(x)).amax(dim=2)


class CNNNet(FlowModel):
    """2-D conv net for images (and vectors reshaped to a square); TextCNN for text."""

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        super().__init__("cnn", preset, task, cfg)
        self.side = 0
        if task.kind == "text":
            e = cfg["embedding_dim"]
            self.embedding = nn.Embedding(task.vocab_size, e, padding_idx=PAD_ID)
            _init_embedding(self.embedding)
            self.kernel_sizes = tuple(cfg["kernel_sizes"])
            self.blocks = nn.ModuleList(_TextConv(e, cfg["filters"], k) for k in self.kernel_sizes)
            d = cfg["filters"] * len(self.kernel_sizes)
        else:
            self.embedding = None
            if task.kind == "vectors":
                dim = task.input_shape[0]
                self.side = _ceil_sqrt(dim)
                if self.side * self.side != dim:
                    log.info("cnn: %d features zero-padded to a %dx%d grid", dim, self.side, self.side)
                c, h, w = 1, self.side, self.side
            else:
                c, h, w = task.input_shape
            blocks = []
            for width in cfg["channels"]:
                pool = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
                if pool == (1, 1):
                    blocks.append(_ConvBlock(c, width, None))
                else:
                    blocks.append(_ConvBlock(c, width, pool))
                    h, w = h // pool[0], w // pool[1]
                c = width
            self.blocks = nn.ModuleList(blocks)
            d = c
        self.drop = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(d, task.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use = self._ckpt()
        if self.embedding is not None:
            ids = self._token_input(x)
            shortest = max(self.kernel_sizes)
            if ids.shape[1] < shortest:
                ids = F.pad(ids, (0, shortest - ids.shape[1]), value=PAD_ID)
            e = self.embedding(ids).transpose(1, 2)
            h = torch.cat([_apply(use, conv, e) for conv in self.blocks], dim=1)
        else:
            x = self._float_input(x)
            if self.side:
                x = _vector_square(x, self.side).unsqueeze(1)
            for block in self.blocks:
                x = _apply(use, block, x)
            h = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(self.drop(h))


# --------------------------------------------------------------------------- rnn


def _rnn_cls(cell: str) -> type[nn.RNNBase]:
    return nn.GRU if cell == "gru" else nn.LSTM


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
            _init_embedding(self.embedding)
            d_in = e
        elif task.kind == "vectors":
            self.side = _ceil_sqrt(task.input_shape[0])
            d_in = self.side
        else:
            c, _, w = task.input_shape
            d_in = c * w
        bidirectional = not self.is_lm
        self.rnn = _rnn_cls(cfg["cell"])(
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
                mask = _text_mask(ids)
                lengths = _lengths(mask)
        else:
            x = self._float_input(x)
            seq = _vector_square(x, self.side) if self.side else _images_as_rows(x)
        out = _apply(self._ckpt(), _run_rnn, self.rnn, seq, lengths)
        if self.is_lm:
            return self.head(self.drop(out))
        h = torch.cat([_masked_mean(out, mask), _masked_max(out, mask)], dim=1)
        return self.head(self.drop(h))


# --------------------------------------------------------------------------- transformer


class TransformerNet(FlowModel):
    """Pre-norm transformer encoder.

    text: token + learned positional embedding, padding-masked attention, masked mean pool.
    lm: causal decoder-only (GPT-style), output tied to the token embedding.
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
        if kind in ("text", "lm"):
            self.embedding = nn.Embedding(task.vocab_size, d,
                                          padding_idx=PAD_ID if kind == "text" else None)
            _init_embedding(self.embedding)
            n_pos = _max_len(task)
        elif kind == "vectors":
            dim = task.input_shape[0]
            self.chunk = _ceil_sqrt(dim)
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
        self.encoder = _EncoderStack(d, cfg["num_heads"], cfg["ffn_dim"], cfg["num_layers"],
                                     cfg["dropout"], causal=kind == "lm")
        if kind == "lm":
            assert self.embedding is not None
            self.head = nn.Linear(d, task.vocab_size, bias=False)
            self.head.weight = self.embedding.weight
        else:
            self.head = nn.Linear(d, task.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.embedding is not None:
            ids = self._token_input(x, self.n_pos)
            h = self.embedding(ids)
            if self.task.kind == "text":
                mask = _text_mask(ids)
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
        if self.task.kind == "lm":
            return self.head(h)
        return self.head(_masked_mean(h, mask))


# --------------------------------------------------------------------------- custom layers

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


class _Stage(nn.Module):
    """One step of a custom model: ``forward(x, mask, use_ckpt)``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, use_ckpt: bool) -> torch.Tensor:
        raise NotImplementedError


class _EmbedStage(_Stage):
    def __init__(self, vocab: int, dim: int, n_pos: int, padding: bool, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD_ID if padding else None)
        _init_embedding(self.embedding)
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


class _EncoderStage(_Stage):
    def __init__(self, stack: _EncoderStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x, mask, use_ckpt):
        return self.stack(x, mask, use_ckpt)


class _RecurrentStage(_Stage):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, mask, use_ckpt):
        lengths = _lengths(mask) if mask is not None else None
        return _apply(use_ckpt, _run_rnn, self.rnn, x, lengths)


class _ModuleStage(_Stage):
    """Wraps a plain module; checkpointed when ``ckpt`` (dense / conv blocks)."""

    def __init__(self, module: nn.Module, ckpt: bool = False) -> None:
        super().__init__()
        self.module = module
        self.ckpt = ckpt

    def forward(self, x, mask, use_ckpt):
        return _apply(use_ckpt and self.ckpt, self.module, x)


class _Reshape(_Stage):
    """Parameter-free change of form between layers."""

    def __init__(self, how: str, side: int = 0) -> None:
        super().__init__()
        self.how = how
        self.side = side

    def forward(self, x, mask, use_ckpt):
        if self.how == "vector_to_image":
            return _vector_square(x, self.side).unsqueeze(1)
        if self.how == "vector_to_seq":
            return _vector_square(x, self.side)
        if self.how == "image_to_seq":
            return _images_as_rows(x)
        if self.how == "flatten":
            return x.flatten(1)
        if self.how == "pool_seq":
            return _masked_mean(x, mask)
        raise AssertionError(self.how)

    def extra_repr(self) -> str:
        return self.how


class CustomNet(FlowModel):
    """A model assembled from a Flow Nexus ``layers`` list (see :func:`build_custom`)."""

    def __init__(self, architecture: str, task: TaskInfo, stages: list[_Stage],
                 config: dict[str, Any]) -> None:
        super().__init__(architecture, "custom", task, config)
        self.stages = nn.ModuleList(stages)
        self.n_pos = config.get("max_len", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.task.kind in ("text", "lm"):
            x = self._token_input(x, self.n_pos)
            if self.task.kind == "text":
                mask = _text_mask(x)
        else:
            x = self._float_input(x)
        use = self._ckpt()
        for stage in self.stages:
            x = stage(x, mask, use)
        return x


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
    if not isinstance(layers, list) or not layers:
        raise ModelError("model 'custom' needs a non-empty 'layers' list, e.g. "
                         "[{\"type\": \"dense\", \"units\": 128}, {\"type\": \"output\"}]")
    kind = task.kind
    n_classes = _out_classes(task)
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
    for i, (type_, _) in enumerate(specs):
        if type_ == "output" and i != len(specs) - 1:
            raise _layer_error(i, type_, "the output layer must be the last layer")
    if specs[-1][0] != "output":
        log.info("custom layers: no output layer given; appending output(num_classes=%d)", n_classes)
        specs.append(("output", {"type": "output"}))

    has_attention = any(t == "transformer_block" for t, _ in specs)
    max_len = _max_len(task) if kind in ("text", "lm") and has_attention else 0

    # form: tokens | seq | flat | image | vector (raw vector data, may become image / rows)
    if kind in ("text", "lm"):
        form, dim, image = "tokens", 0, (0, 0, 0)
    elif kind == "vectors":
        form, dim, image = "vector", task.input_shape[0], (0, 0, 0)
    else:
        form, dim, image = "image", 0, tuple(task.input_shape)
    side = _ceil_sqrt(task.input_shape[0]) if kind == "vectors" else 0

    stages: list[_Stage] = []

    def to_seq(r: _LayerReader) -> int:
        nonlocal form
        if form == "seq":
            return dim
        if form == "vector":
            stages.append(_Reshape("vector_to_seq", side))
            form = "seq"
            return side
        if form == "image":
            stages.append(_Reshape("image_to_seq"))
            form = "seq"
            return image[0] * image[2]
        raise r.err("needs a sequence (token embeddings, image rows or raw vector rows) but "
                    "follows a flattening layer; move it before dense layers")

    for i, (type_, spec) in enumerate(specs):
        r = _LayerReader(i, type_, spec)
        if kind in ("text", "lm") and i == 0 and type_ != "embedding":
            raise r.err(f"{kind} data needs an 'embedding' layer first, e.g. "
                        "{\"type\": \"embedding\", \"embedding_dim\": 64}")
        if type_ == "embedding":
            if kind not in ("text", "lm"):
                raise r.err(f"an embedding layer needs token data (text or lm), but the dataset "
                            f"kind is {kind!r}; remove it")
            if i != 0:
                raise r.err("the embedding layer must be the first layer")
            e = r.int("embedding_dim")
            if "vocab_size" in spec and spec["vocab_size"] is not None:
                given = r.int("vocab_size")
                if given != task.vocab_size:
                    log.warning("layers[%d] (embedding): vocab_size %d differs from the dataset's "
                                "vocabulary %d; using %d", i, given, task.vocab_size, task.vocab_size)
            stages.append(_EmbedStage(task.vocab_size, e, max_len, kind == "text", r.rate("dropout")))
            form, dim = "seq", e
        elif type_ == "transformer_block":
            d = to_seq(r)
            heads = r.int("num_heads")
            if d % heads:
                divisors = [h for h in range(1, min(d, 16) + 1) if d % h == 0]
                raise r.err(
                    f"'num_heads' = {heads} does not divide the model width {d} (embedding_dim "
                    f"or the previous layer's size); use num_heads in {divisors} or change the width"
                )
            ffn = r.int("hidden_dim", 4 * d)
            n = r.int("num_layers", 1)
            stages.append(_EncoderStage(_EncoderStack(d, heads, ffn, n, r.rate("dropout", 0.1),
                                                      causal=kind == "lm")))
            dim = d
        elif type_ in ("lstm", "gru"):
            d = to_seq(r)
            hidden = r.int("hidden_size")
            n = r.int("num_layers", 1)
            bidir = r.bool("bidirectional", kind != "lm")
            if bidir and kind == "lm":
                raise r.err("'bidirectional' must be false for language modelling (a backward "
                            "pass would see the tokens it has to predict)")
            rnn = _rnn_cls(type_)(d, hidden, num_layers=n, batch_first=True, bidirectional=bidir,
                                  dropout=r.rate("dropout") if n > 1 else 0.0)
            stages.append(_RecurrentStage(rnn))
            dim = hidden * (2 if bidir else 1)
        elif type_ == "dense":
            if form == "image":
                stages.append(_Reshape("flatten"))
                form, dim = "flat", math.prod(image)
            elif form == "vector":
                form = "flat"
            units = r.int("units")
            stages.append(_ModuleStage(nn.Sequential(nn.Linear(dim, units), r.activation()), ckpt=True))
            dim = units
        elif type_ == "dropout":
            stages.append(_ModuleStage(nn.Dropout(r.rate("rate"))))
        elif type_ in ("conv2d", "maxpool2d"):
            if form == "vector":
                stages.append(_Reshape("vector_to_image", side))
                form, image = "image", (1, side, side)
            if form != "image":
                raise r.err(f"{type_} needs image data (or raw vectors that reshape to a square); "
                            f"here it gets {'token sequences' if kind in ('text', 'lm') else 'flat features'}"
                            "; remove it or put it before dense/lstm layers")
            c, h, w = image
            if type_ == "conv2d":
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
                stages.append(_ModuleStage(nn.Sequential(*mods), ckpt=True))
            else:
                pool = r.int("pool_size", 2)
                stages.append(_ModuleStage(nn.MaxPool2d(pool)))
                h, w = h // pool, w // pool
            if h < 1 or w < 1:
                raise r.err(f"the image shrinks to {h}x{w} here; use a smaller stride/pool or fewer layers")
            image = (c, h, w)
        elif type_ == "output":
            given = spec.get("num_classes")
            if given is not None:
                got = r.int("num_classes")
                if got != n_classes:
                    what = "vocabulary size" if kind == "lm" else "number of classes"
                    raise r.err(f"'num_classes' = {got} but the dataset's {what} is {n_classes}; "
                                f"set it to {n_classes} or leave it out")
            act = spec.get("activation")
            if act not in (None, "softmax", "linear", "none", "log_softmax"):
                raise r.err(f"'activation' = {act!r}: the output layer returns logits; "
                            "leave activation out (softmax is applied by the loss)")
            if form == "seq" and kind != "lm":
                stages.append(_Reshape("pool_seq"))
                form = "flat"
            elif form == "image":
                stages.append(_Reshape("flatten"))
                form, dim = "flat", math.prod(image)
            elif form == "vector":
                form = "flat"
            stages.append(_ModuleStage(nn.Linear(dim, n_classes)))
    config = {"layers": [dict(s) for _, s in specs], "max_len": max_len}
    return CustomNet(architecture, task, stages, config)


# --------------------------------------------------------------------------- public API

_BUILDERS: dict[str, tuple[type[FlowModel], dict[str, dict[str, Any]]]] = {
    "mlp": (MLPNet, MLP_PRESETS),
    "cnn": (CNNNet, CNN_PRESETS),
    "rnn": (RNNNet, RNN_PRESETS),
    "transformer": (TransformerNet, TRANSFORMER_PRESETS),
}


def build_model(architecture: str, preset: str, task: TaskInfo,
                layers: list[dict[str, Any]] | None = None,
                gradient_checkpointing: bool = False) -> nn.Module:
    """Build a freshly initialised model (deterministic given ``torch.manual_seed``).

    Raises :class:`ModelError` (before any module is built) when the architecture does not fit
    the dataset kind, the preset is unknown, or the custom layer list is invalid.
    """
    check_compatible(architecture, task.kind)
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    _validate_task(task)
    if task.kind == "lm" and task.num_classes == 0:
        task = TaskInfo(task.kind, tuple(task.input_shape), task.vocab_size, task.vocab_size, task.max_len)
    if preset == "custom":
        if not layers:
            raise ModelError("model 'custom' needs a 'layers' list, e.g. [{\"type\": \"embedding\", "
                             "\"embedding_dim\": 64}, {\"type\": \"transformer_block\", \"num_heads\": 4, "
                             "\"hidden_dim\": 128, \"num_layers\": 2}, {\"type\": \"output\"}]")
        model: FlowModel = build_custom(architecture, task, layers)
    else:
        if layers:
            raise ModelError(f"'layers' were given but model is {preset!r}; set model to 'custom' "
                             "to build from layers, or drop 'layers' to use the preset")
        cls, table = _BUILDERS[architecture]
        model = cls(preset, task, dict(table[preset]))
    model.gradient_checkpointing = bool(gradient_checkpointing)
    info = describe_model(model)
    log.info("built %s/%s for %s %s: %d parameters (%.2f MiB)", architecture, preset, task.kind,
             tuple(task.input_shape) or f"vocab={task.vocab_size}", info["parameters"], info["size_mb"])
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Parameter count (shared/tied parameters counted once), size of parameters + buffers in
    MiB (2**20 bytes), and what the model is."""
    inner = model
    while not isinstance(inner, FlowModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # DDP / wrappers
    params = list(inner.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    n_bytes += sum(b.numel() * b.element_size() for b in inner.buffers())
    task = getattr(inner, "task", None)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "size_mb": round(n_bytes / 2**20, 4),
        "architecture": getattr(inner, "architecture", type(inner).__name__),
        "preset": getattr(inner, "preset", None),
        "kind": task.kind if task is not None else None,
        "config": dict(getattr(inner, "config", {})),
        "gradient_checkpointing": bool(getattr(inner, "gradient_checkpointing", False)),
    }
