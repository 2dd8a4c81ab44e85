"""Which torch.distributed backend a cluster's group uses, and which GPU each node pins.

Pure functions: the cluster service feeds them what the nodes reported in their health
replies, so the rules are tested without a GPU.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import NextStep, ServiceError

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


@dataclass(frozen=True)
class NodeGpus:
    """What one node reported about its GPUs (health reply), with the host it runs on."""

    node_id: str
    host: str | None
    devices: int
    visible: str | None = None  # its CUDA_VISIBLE_DEVICES


def choose_backend(requested: str, nodes: list[NodeGpus]) -> tuple[str, str]:
    """(backend, why) for a group of ``nodes`` in rank order. ``auto`` picks nccl only when
    every node sees a GPU and no two nodes would pin the same one (NCCL takes one GPU per
    rank); ``nccl`` without that is a ServiceError that names the nodes."""
    if requested == "gloo":
        return "gloo", "backend 'gloo' was asked for"
    blind = sorted(n.node_id for n in nodes if n.devices < 1)
    if blind:
        if requested == "nccl":
            raise ServiceError(
                f"backend 'nccl' needs a CUDA device on every node, and {', '.join(blind)} "
                f"{'sees' if len(blind) == 1 else 'see'} none; reconnect with backend 'auto' or 'gloo', "
                "or replace those nodes with GPU nodes", next_step=NextStep.CHOOSE_BACKEND)
        return "gloo", f"{len(blind)} of {len(nodes)} node(s) see no CUDA device"
    if not nodes:
        return "gloo", "no nodes"
    clash = shared_gpu(nodes)
    if clash is not None:
        first, second, gpu, host = clash
        problem = (f"{first} and {second} would both pin GPU {gpu} of {host or 'the same host'}, and NCCL "
                   "takes one GPU per rank")
        if requested == "nccl":
            raise ServiceError(
                f"backend 'nccl': {problem}; deploy at most as many nodes on a machine as it has GPUs, "
                "give each node a GPU of its own (num_gpus 1 with launcher ray), or use backend 'auto' or 'gloo'"
            )
        return "gloo", problem
    if requested == "nccl":
        return "nccl", "backend 'nccl' was asked for and every node has a GPU of its own"
    return "nccl", "every node has a GPU of its own"


def pinned_gpu(local_rank: int, devices: int, visible: str | None) -> str:
    """The host GPU a node pins: its ``local_rank % devices`` visible device, named by the
    CUDA_VISIBLE_DEVICES entry it maps to when that variable lists them."""
    index = local_rank % devices
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    return entries[index] if len(entries) >= devices else str(index)


def shared_gpu(nodes: list[NodeGpus]) -> tuple[str, str, str, str | None] | None:
    """(first node, second node, gpu, host) for the first two nodes that would pin the same
    GPU of the same host, or None."""
    owner: dict[tuple[str | None, str], str] = {}
    for node, local in zip(nodes, local_ranks([n.host for n in nodes])):
        key = (node.host, pinned_gpu(local, node.devices, node.visible))
        if key in owner:
            return owner[key], node.node_id, key[1], node.host
        owner[key] = node.node_id
    return None


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
