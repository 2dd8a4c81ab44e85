"""The devices a node computes on: how many GPUs it sees, which one it pins, and the
process-group backend string that carries CPU tensors over gloo and GPU tensors over NCCL.

With backend ``nccl`` the group is ``cpu:gloo,cuda:nccl``: every collective on CPU tensors
(metric sums, stop flags, objects, link probes, parameter exchanges of the non-DDP modes) keeps
using gloo, and the GPU gradient buckets of synchronous training go over NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices this process's torch sees; 0 on a CPU build or when the driver fails."""
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver reads as no GPU, and says why in the node log
        log.warning("CUDA device count failed; treating this node as CPU-only", exc_info=True)
        return 0


def cuda_visible() -> str | None:
    """CUDA_VISIBLE_DEVICES as this node sees it: the server tells isolated GPUs (Ray's
    num_gpus sets it per actor) from shared ones with it, without touching CUDA here."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def group_backend(backend: str) -> str:
    """The ``init_process_group`` backend for a cluster backend (gloo | nccl)."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"


def pin_device(backend: str, local_rank: int) -> torch.device:
    """The device this node computes on for ``backend``; with nccl, the GPU of its local rank
    (``local_rank % devices seen``) becomes the current CUDA device."""
    if backend != "nccl":
        return torch.device("cpu")
    n = cuda_device_count()
    if n < 1:
        raise RuntimeError("backend nccl needs a CUDA device and this node's torch sees none")
    device = torch.device("cuda", local_rank % n)
    torch.cuda.set_device(device)
    # On a collective timeout NCCL's default (3) tears the whole process down; 2 aborts the
    # communicators and raises, so the node survives and the job fails with a message, as on gloo.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    return device


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when asked for and supported; a no-op otherwise (a GPU
    without native bf16, e.g. V100 or T4, trains in fp32 rather than in emulated bf16 or in fp16
    without a loss scaler)."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)
