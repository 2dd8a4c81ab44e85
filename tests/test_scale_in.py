"""Scale-in bookkeeping of a running session (no node processes): which removals a session takes
at its next boundary, and the refusals that keep it able to run."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flow_nexus_server.service.errors import Conflict
from flow_nexus_server.service.training import LiveSession, NodeView, TrainingService
from flow_nexus_server.store import Cluster, Node, Store
from workers import protocol as p


def _service(tmp_path: Path, roles: list[str], mode: str) -> tuple[TrainingService, LiveSession, list[Node]]:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    nodes = [Node(id=f"n{i}", cluster_id="c1", seq=i, role=role, status="running", model="base",
                  capabilities=["training"], sandbox=str(tmp_path / f"n{i}")) for i, role in enumerate(roles)]
    with store.session() as s:
        s.add(Cluster(id="c1", name="c", status="training", topology="mesh", architecture="mlp",
                      consensus="proof-of-learning", launcher="subprocess", backend="gloo", max_nodes=8,
                      auto_healing=False, token="t", directory=str(tmp_path)))
        s.add_all(nodes)
    clusters = SimpleNamespace(store=store, telemetry=SimpleNamespace(), on_node_lost=[], on_training_membership=[],
                               on_training_leave=[], settings=SimpleNamespace(home=tmp_path))
    service = TrainingService(clusters)  # type: ignore[arg-type]
    job = p.TrainJob(dataset="digits", session_id="s1", mode=mode, topology="mesh", architecture="mlp", roles=roles)
    live = LiveSession("s1", "c1", mode, time.time(), [NodeView(n) for n in nodes], job=job)
    service.live["s1"], service.by_cluster["c1"] = live, "s1"
    return service, live, nodes


def test_a_removed_worker_leaves_at_the_next_boundary(tmp_path: Path) -> None:
    service, live, nodes = _service(tmp_path, ["worker", "worker"], "sync")
    assert service.clusters.on_training_leave[0]("c1", nodes[1]) is True
    assert set(live.leaving) == {"n1"} and "n1" in (live.rescale or "")
    with pytest.raises(Conflict, match="n0 is the last worker with the 'training' capability"):
        service.clusters.on_training_leave[0]("c1", nodes[0])
    assert set(live.leaving) == {"n1"}  # the refusal changed nothing


def test_the_last_parameter_server_of_a_parameter_server_run_stays(tmp_path: Path) -> None:
    service, live, nodes = _service(tmp_path, ["parameter_server", "worker", "worker"], "parameter_server")
    with pytest.raises(Conflict, match="n0 is the last parameter server"):
        service.clusters.on_training_leave[0]("c1", nodes[0])
    assert not live.leaving and live.rescale is None


def test_no_running_session_takes_no_removal(tmp_path: Path) -> None:
    service, live, nodes = _service(tmp_path, ["worker", "worker"], "sync")
    live.stop_requested = True
    assert service.clusters.on_training_leave[0]("c1", nodes[1]) is False
