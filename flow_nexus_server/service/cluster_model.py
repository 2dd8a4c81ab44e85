"""Which model a training session builds from the cluster's nodes, and which training options
change nothing in the mode the session runs in (said in the reply's ``ignored``)."""

from __future__ import annotations

from typing import Any

from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.store import Node
from workers import protocol as p


def cluster_model(nodes: list[Node], trainers: list[Node]) -> tuple[str, list[dict[str, Any]] | None, dict[str, str]]:
    """(preset, layers, ignored) of the one model the cluster trains.

    A layer list on any node (whatever its role) defines the model; two different lists are an
    error naming both nodes. Without one, the first training worker's preset is used and the other
    presets asked for are reported as ignored."""
    with_layers = [n for n in nodes if n.layers]
    for other in with_layers[1:]:
        if other.layers != with_layers[0].layers:
            raise ServiceError(f"nodes {with_layers[0].id} and {other.id} carry different layer lists; the cluster "
                               "trains one model: deploy the layer list on one node only (or the same list on each)")
    if with_layers:
        presets = sorted({n.model for n in nodes if n.model != "custom"})
        ignored = {"model": f"node {with_layers[0].id}'s layer list defines the cluster's model; preset(s) "
                            f"{', '.join(presets)} not used"} if presets else {}
        return "custom", with_layers[0].layers, ignored
    preset = trainers[0].model
    others = sorted({f"{n.model} ({n.role})" for n in nodes if n.model != preset})
    ignored = {"model": f"the cluster trains one model, the training workers' {preset!r}; "
                        f"{', '.join(others)} not used"} if others else {}
    return preset, None, ignored


def options_ignored(req: p.TrainOptions, mode: str) -> dict[str, str]:
    """Training options the client set that the session's mode does not use."""
    ignored = {}
    if req.gradient_compression and mode != "sync":
        ignored["gradient_compression"] = (f"{mode} runs exchange {'models' if mode == 'federated' else 'weights'}, "
                                           "not DDP gradient buckets; compression applies to synchronous training")
    if mode != "federated" and req.local_epochs != 1:
        ignored["local_epochs"] = "only federated rounds have local epochs"
    return ignored
