"""A node's memory budget, enforced while running: before a session starts and by the monitor.

``memory_mb`` (given when deploying nodes, default FLOW_NEXUS_NODE_MEMORY_MB) is the memory a node's
training may use besides the node's own runtime (Python and torch: ~180-420 MB by build, more
with CUDA). A session whose model the node estimates above it is refused before it starts; a
node whose resident memory passes its limit while running is stopped.
"""

from __future__ import annotations

import math
from typing import Any

from flow_nexus_server.config import Settings
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.store import Node
from workers import protocol as p

# RSS limit = memory_mb x ESTIMATE_MARGIN + NODE_RUNTIME_MB (+ CUDA_RUNTIME_MB on a node that sees
# a GPU). The margin: the pre-start figure is an estimate, and the allocator's cache, the dataset
# and short evaluation peaks come on top of it (a base transformer on bbc-news, estimated at
# 716 MB, peaked ~680 MB over the node's start). The runtime is outside memory_mb: a CPU node
# starts at ~180-420 MB depending on the torch build, and the CUDA runtime maps its libraries
# into host memory at the first GPU use. A node's RSS rarely shrinks after a session, so the
# limit has to hold the largest session it ran, not only the current one.
ESTIMATE_MARGIN = 1.5
NODE_RUNTIME_MB = 512
CUDA_RUNTIME_MB = 2048


def node_memory_mb(node: Node, settings: Settings) -> int:
    """The memory_mb a node was deployed with (older records: the server's default)."""
    return int(node.options.get("memory_mb") or settings.limits.node_memory_mb)


def rss_limit_mb(node: Node, settings: Settings) -> float:
    """Resident memory above which the monitor stops the node."""
    limit = node_memory_mb(node, settings) * ESTIMATE_MARGIN + NODE_RUNTIME_MB
    return limit + (CUDA_RUNTIME_MB if node.options.get("cuda_devices") else 0)


def over_memory(node: Node, rss_bytes: int, settings: Settings) -> tuple[float, float] | None:
    """(rss_mb, limit_mb) when the node's RSS is past its limit, else None."""
    rss_mb, limit = rss_bytes / 2**20, rss_limit_mb(node, settings)
    return (rss_mb, limit) if rss_mb > limit else None


def check_training_memory(node: Node, check: p.DatasetCheck, job: p.TrainJob, settings: Settings) -> None:
    """Refuse a session whose model the node estimated above the memory_mb it was deployed with."""
    need, budget = check.estimated_train_mb, node_memory_mb(node, settings)
    if need is None or need <= budget:
        return
    parts = check.memory_breakdown_mb
    detail = (f" (weights, gradients and optimizer state {parts['model_state_mb']:,.0f} MB, activations "
              f"{parts['activations_mb']:,.0f} MB)" if "model_state_mb" in parts else "")
    suggest = max(100, math.ceil(need / 100) * 100)
    model = f"the {job.model} {job.architecture} model" if job.model == "custom" else \
        f"the {job.architecture} '{job.model}' model"
    raise ServiceError(
        f"{model} has {check.parameters:,} parameters; training it with batch_size {job.batch_size} needs about "
        f"{need:,.0f} MB per node{detail}, over the {budget:,} MB (memory_mb) node {node.id} was deployed with; "
        f"use fewer or smaller layers, a smaller preset or batch_size, or deploy nodes with memory_mb >= {suggest}")


TRAIN_COPIES = 9
"""float32 copies of the weights training holds per node (workers.budget: measured 8.7 for an MLP with Adam)."""


def layer_list_parameters(layers: list[dict[str, Any]]) -> int | None:
    """Parameters a layer list declares by its own sizes (its vocab_size and num_classes, before the
    dataset's replace them); None when a layer's input size cannot be known without the data."""
    width, total = None, 0
    for layer in layers:
        kind = layer.get("type")
        if kind == "embedding":
            if not layer.get("vocab_size") or not layer.get("embedding_dim"):
                return None
            width = layer["embedding_dim"]
            total += layer["vocab_size"] * width
        elif kind == "transformer_block" and width:
            hidden = layer.get("hidden_dim") or 4 * width
            per_block = 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width
            total += (layer.get("num_layers") or 1) * per_block
        elif kind in ("lstm", "gru") and width:
            size, gates = layer.get("hidden_size") or width, 4 if kind == "lstm" else 3
            directions = 2 if layer.get("bidirectional") else 1
            per_layer = gates * (width * size + size * size + 2 * size) * directions
            total += (layer.get("num_layers") or 1) * per_layer
            width = size * directions
        elif kind == "dense" and width and layer.get("units"):
            total += width * layer["units"] + layer["units"]
            width = layer["units"]
        elif kind == "output" and width and layer.get("num_classes"):
            total += width * layer["num_classes"] + layer["num_classes"]
        elif kind not in ("dropout",):
            return None
    return total


def check_layer_list_memory(layers: list[dict[str, Any]] | None, memory_mb: int) -> None:
    """Refuse, at deploy, a layer list whose declared model cannot be trained within ``memory_mb``."""
    params = layer_list_parameters(layers or [])
    if not params:
        return
    need = params * 4 * TRAIN_COPIES / 2**20
    if need <= memory_mb:
        return
    raise ServiceError(
        f"the layer list declares a model of about {params:,} parameters ({params / 1e6:,.0f}M); training it needs "
        f"about {need:,.0f} MB per node ({TRAIN_COPIES} float32 copies: weights, gradients, optimizer state, "
        f"communication and checkpoint copies), over the {memory_mb:,} MB (memory_mb) a node gets; use fewer or "
        f"smaller layers, or deploy with memory_mb >= {math.ceil(need / 100) * 100} where the host has that much")
