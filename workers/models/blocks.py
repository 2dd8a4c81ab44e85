"""Pieces the networks share: tensor reshapes, masked pooling, packed RNN runs, optional
gradient checkpointing, initialisation and the transformer encoder stack."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from .task import PAD_ID


def ceil_sqrt(n: int) -> int:
    """Side of the smallest square grid that holds ``n`` values."""
    return math.isqrt(n - 1) + 1 if n > 1 else 1


def vector_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, d) -> (B, side, side), zero-padding the tail (64 features -> 8x8 exactly)."""
    pad = side * side - x.shape[1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], side, side)


def images_as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, C*W): one sequence step per image row."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


def text_mask(ids: torch.Tensor) -> torch.Tensor:
    """True at real tokens; a row made only of PAD keeps its first position."""
    mask = ids != PAD_ID
    empty = ~mask.any(dim=1)
    if not ids.is_meta and bool(empty.any()):  # meta (shape-only) tensors have no values to test
        mask = mask.clone()
        mask[:, 0] |= empty
    return mask


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of ``h`` (B, L, D), counting only positions where ``mask`` is true."""
    if mask is None:
        return h.mean(dim=1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def masked_max(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max over the sequence of ``h`` (B, L, D), ignoring positions where ``mask`` is false."""
    if mask is None:
        return h.amax(dim=1)
    return h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(dim=1)


def packed_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Sequence lengths for packing: index of the last real token + 1 (CPU int64); None for a
    shape-only (meta) batch, which runs unpacked."""
    if mask.is_meta:
        return None
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (pos * mask).amax(dim=1).clamp(min=1).cpu()


def rnn_cls(cell: str) -> type[nn.RNNBase]:
    """The torch RNN class of a cell name: ``gru``, else LSTM."""
    return nn.GRU if cell == "gru" else nn.LSTM


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Outputs of ``rnn`` over ``x``, packed so padding past ``lengths`` is skipped."""
    if lengths is None:
        return rnn(x)[0]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out


def checkpointed(use_ckpt: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, recomputed in the backward pass when ``use_ckpt`` (saves memory)."""
    if use_ckpt:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8, 4 or 1 groups, whichever divides ``channels`` first."""
    groups = 8 if channels % 8 == 0 else (4 if channels % 4 == 0 else 1)
    return nn.GroupNorm(groups, channels)


def init_embedding(emb: nn.Embedding) -> None:
    """Small normal weights, and a zero vector for the padding id."""
    nn.init.normal_(emb.weight, std=0.02)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].zero_()


class EncoderStack(nn.Module):
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
            x = checkpointed(use_ckpt, layer, x, **kwargs)
        return self.norm(x)
