"""ADVERSARY SIMULATION -- for robustness testing only; nothing here is a real attack surface.

A job's ``behaviors[rank]`` (``workers.protocol.Behavior``) makes the node at that rank act
as a Byzantine participant: it corrupts the model update it SENDS and nothing else. Its own
local training stays honest (it trains on its own shard with its own optimizer as any worker
does) and it keeps claiming its normal sample count, so the receiver cannot tell it apart by
its metadata. A rank beyond the end of the list, or ``kind == "honest"``, sends the truth.

What is corrupted, per mode:

* federated (proof-of-learning / byzantine / raft): the flat weights sent to the aggregator;
* federated gossip: the flat weights sent to the neighbours;
* sync with consensus ``byzantine``: the flat gradient sent to the hub.

Weights. With ``g`` the global model the worker started the round from, ``w`` its honestly
trained local weights and ``u = w - g`` its update, the weights sent are

=================  ======================================================================
``gaussian_noise``  ``w + scale * N(0, 1)`` -- noise added to the local weights, which is the
                    same as noise on the update (``g + u + noise``): the byzantine row of
                    the benchmark (README, Benchmarks: one worker sends w + 50 N(0,1))
``sign_flip``       ``g - scale * u`` (``scale`` = 1: the plain flipped update)
``scaled``          ``g + scale * u``
``nan``             every value NaN
=================  ======================================================================

Gradients (sync, byzantine): ``gaussian_noise`` -> ``grad + scale * N(0, 1)``, ``sign_flip``
-> ``-scale * grad``, ``scaled`` -> ``scale * grad``, ``nan`` -> all NaN.

Noise is drawn from a generator seeded by (job seed, rank, round/step), so a run is
reproducible.
"""

from __future__ import annotations

import torch

from workers.protocol import Behavior, TrainJob

HONEST = Behavior()


def behavior_of(job: TrainJob, rank: int) -> Behavior:
    """The behaviour the job assigns to ``rank`` (honest when the list is short or empty)."""
    behaviors = getattr(job, "behaviors", None) or []
    return behaviors[rank] if 0 <= rank < len(behaviors) else HONEST


def is_honest(b: Behavior) -> bool:
    return b.kind == "honest"


def describe(b: Behavior) -> str:
    if b.kind in ("gaussian_noise", "scaled", "sign_flip"):
        return f"{b.kind} (scale {b.scale:g})"
    return b.kind


def _noise(like: torch.Tensor, seed: int, rank: int, when: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rank) * 7_919 + int(when)) & 0x7FFFFFFFFFFFFFFF)
    return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.dtype)


def corrupt_weights(local: torch.Tensor, start: torch.Tensor, b: Behavior, *, seed: int, rank: int,
                    when: int) -> torch.Tensor:
    """The flat weights a worker of behaviour ``b`` sends: ``local`` trained from ``start``."""
    if b.kind == "honest":
        return local
    if b.kind == "gaussian_noise":
        return local + float(b.scale) * _noise(local, seed, rank, when)
    if b.kind == "sign_flip":
        return start - float(b.scale) * (local - start)
    if b.kind == "scaled":
        return start + float(b.scale) * (local - start)
    if b.kind == "nan":
        return torch.full_like(local, float("nan"))
    raise ValueError(f"unknown behavior {b.kind!r}")


def corrupt_gradient(grad: torch.Tensor, b: Behavior, *, seed: int, rank: int, when: int) -> torch.Tensor:
    """The flat gradient a worker of behaviour ``b`` sends to the hub."""
    if b.kind == "honest":
        return grad
    if b.kind == "gaussian_noise":
        return grad + float(b.scale) * _noise(grad, seed, rank, when)
    if b.kind == "sign_flip":
        return -float(b.scale) * grad
    if b.kind == "scaled":
        return float(b.scale) * grad
    if b.kind == "nan":
        return torch.full_like(grad, float("nan"))
    raise ValueError(f"unknown behavior {b.kind!r}")


__all__ = ["behavior_of", "corrupt_gradient", "corrupt_weights", "describe", "is_honest"]
