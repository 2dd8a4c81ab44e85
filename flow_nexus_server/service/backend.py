"""Which torch.distributed backend a cluster's group uses, and which GPU each node pins.

Pure functions: the cluster service feeds them what the nodes reported in their health
replies, so the rules are tested without a GPU.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .errors import ServiceError

LOCAL_LAUNCHERS = ("subprocess",)
"""Launchers whose nodes run on this machine and so see the GPUs this machine shows."""


def gpus_visible_here() -> bool:
    """Whether this machine shows an NVIDIA device to its processes, checked without importing
    torch (the server never loads it): a /dev/nvidia<N> node and CUDA_VISIBLE_DEVICES not
    hiding them all. The nodes' own torch has the last word at connect."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return any(p.name[len("nvidia"):].isdigit() for p in Path("/dev").glob("nvidia*"))


def check_requested(backend: str, launcher: str) -> None:
    """At init: refuse ``nccl`` when the nodes would run here and this machine has no GPU."""
    if backend == "nccl" and launcher in LOCAL_LAUNCHERS and not gpus_visible_here():
        raise ServiceError(
            f"backend 'nccl' needs a CUDA device on every node, and launcher {launcher!r} runs the nodes "
            "on this machine, which shows none; use backend 'auto' (gloo here) or 'gloo', or a launcher "
            "whose nodes run on GPU machines (ray, docker)"
        )


def check_gpus(num_gpus: float, launcher: str) -> None:
    """At deploy: refuse GPUs for nodes that would run here when this machine has none."""
    if num_gpus > 0 and launcher in LOCAL_LAUNCHERS and not gpus_visible_here():
        raise ServiceError(
            f"num_gpus {num_gpus:g} asked for, but launcher {launcher!r} runs the nodes on this machine, "
            "which shows no GPU; deploy with num_gpus 0, or use a cluster whose launcher (ray, docker) "
            "places nodes on GPU machines"
        )


def choose_backend(requested: str, cuda_devices: dict[str, int]) -> tuple[str, str]:
    """(backend, why) for a group of nodes; ``cuda_devices`` maps node id -> CUDA devices its
    torch sees. ``auto`` picks nccl only when every node sees one; ``nccl`` without that is a
    ServiceError naming the nodes that see none."""
    blind = sorted(node for node, n in cuda_devices.items() if n < 1)
    if requested == "gloo":
        return "gloo", "backend 'gloo' was asked for"
    if requested == "nccl":
        if blind:
            raise ServiceError(
                f"backend 'nccl' needs a CUDA device on every node, and {', '.join(blind)} "
                f"{'sees' if len(blind) == 1 else 'see'} none; reconnect with backend 'auto' or 'gloo' "
                "(neural_cluster_init), or replace those nodes with GPU nodes"
            )
        return "nccl", "backend 'nccl' was asked for and every node sees a CUDA device"
    if cuda_devices and not blind:
        return "nccl", "every node sees a CUDA device"
    return "gloo", f"{len(blind)} of {len(cuda_devices)} node(s) see no CUDA device"


def local_ranks(hosts: list[str | None]) -> list[int]:
    """Each rank's position among the ranks on the same host (rank order): the GPU it pins is
    ``local_rank % devices it sees``, so nodes sharing a machine take different GPUs and a node
    that sees one GPU (Ray's num_gpus, CUDA_VISIBLE_DEVICES) takes that one."""
    seen: Counter[str | None] = Counter()
    out = []
    for host in hosts:
        out.append(seen[host])
        seen[host] += 1
    return out
