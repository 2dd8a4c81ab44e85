"""Push telemetry, one liveness rule, leases, and the Prometheus text.

Nodes push their health and progress to the controller every second; status reads what they
pushed, the monitor alone declares a silent node lost (one node_failed event), a node whose
controller is gone stops itself once idle past its lease grace, and POST /lease points a live
node at a new controller.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import ok, pid_alive
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.metrics import render_metrics
from flow_nexus_server.service.node_client import NodeClient
from flow_nexus_server.service.telemetry import NODE_SILENT_S
from flow_nexus_server.service.training import TrainingService
from flow_nexus_server.store import Event, Node
from workers import protocol as p

GRACE_S = 3.0


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def new_cluster(svc: ClusterService, name: str, count: int) -> tuple[str, list[Node]]:
    cid = svc.init_cluster(name=name, topology="mesh", architecture="mlp", consensus="proof-of-learning",
                           launcher="subprocess", backend="auto", max_nodes=4, auto_healing=False,
                           wasm_optimization=False, daa_enabled=False).cluster_id
    svc.deploy_nodes(cid, role="worker", count=count, model="base", capabilities=["training"], autonomy=0.8,
                     template="", layers=None)
    return cid, svc.store.nodes(cid)


def node_client(svc: ClusterService, node: Node) -> NodeClient:
    return NodeClient(node.id, node.host, node.port, svc.get_cluster(node.cluster_id).token)


def metric_values(text: str) -> dict[str, list]:
    """name -> its samples, from Prometheus text (which must parse)."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


@pytest.mark.anyio
async def test_status_reads_pushes_and_the_monitor_alone_declares_a_frozen_node_lost(home):
    service = ClusterService(Settings.from_env(home))
    async with Client(build_server(Settings.from_env(home), service=service)) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "pushes"}))["cluster_id"]
        nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]
        frozen, other = nodes
        for _ in range(100):  # pushes arrive every second: the ages stay small
            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            ages = [n["heartbeat_age_s"] for n in status["nodes"]]
            if all(age is not None and age < 1.5 for age in ages) and \
                    all(time.time() - n["last_heartbeat"] < 1.5 for n in status["nodes"]):
                break
            await anyio.sleep(0.2)
        assert all(n["alive"] and n["rss_mb"] > 50 and n["metrics"]["job_state"] == "idle" for n in status["nodes"])

        os.kill(frozen["pid"], signal.SIGSTOP)
        try:
            for _ in range(int((NODE_SILENT_S + 20) / 0.25)):
                status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
                row = next(n for n in status["nodes"] if n["node_id"] == frozen["node_id"])
                if row["status"] == "failed":
                    break
                # Until then status answers from memory, the frozen node's heartbeat getting older.
                await anyio.sleep(0.25)
            assert row["status"] == "failed" and "no telemetry push" in row["error"], row
            assert not row["alive"]
            for _ in range(40):  # the hung process is stopped, not left behind
                if not pid_alive(frozen["pid"]):
                    break
                await anyio.sleep(0.25)
            assert not pid_alive(frozen["pid"])
        finally:
            if pid_alive(frozen["pid"]):
                os.kill(frozen["pid"], signal.SIGKILL)
        with service.store.session() as db:
            failed = list(db.scalars(select(Event).where(Event.cluster_id == cid, Event.kind == "node_failed")
                                     .order_by(Event.id)))
        assert [e.node_id for e in failed] == [frozen["node_id"]], [e.message for e in failed]
        row = next(n for n in status["nodes"] if n["node_id"] == other["node_id"])
        assert row["alive"] and row["status"] == "running"
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


def test_leases_metrics_and_repointing(home, monkeypatch):
    """One controller trains on cluster T and holds idle clusters I and R, then goes away without
    stopping them: I's node stops itself after the grace, T's nodes train on until their job ends
    and then stop too, R's node is pointed at a new controller with POST /lease and stays."""
    monkeypatch.setenv("FLOW_NEXUS_LEASE_GRACE_S", str(GRACE_S))  # the nodes inherit it
    settings = Settings.from_env(home)
    first = ClusterService(settings)
    training = TrainingService(first)
    second: ClusterService | None = None
    pids: list[int] = []
    try:
        train_id, trainers = new_cluster(first, "T", 2)
        _, (idle,) = new_cluster(first, "I", 1)
        repointed_id, (repointed,) = new_cluster(first, "R", 1)
        pids = [n.pid for n in (*trainers, idle, repointed)]
        first.connect(train_id)
        run = training.start_from_dict(train_id, {"dataset": "digits", "epochs": 1000, "learning_rate": 0.01})
        wait_for(lambda: (training.live_view(train_id).epoch or 0) >= 2, 120, "two epochs pushed")

        # The Prometheus text, while the job trains: node and session figures.
        values = metric_values(render_metrics(first, training).decode())
        up = {s.labels["node_id"]: s.value for s in values["flow_nexus_node_up"]}
        assert all(up[n.id] == 1.0 for n in (*trainers, idle, repointed)), up
        rss = {s.labels["node_id"]: s.value for s in values["flow_nexus_node_rss_bytes"]}
        assert all(rss[n.id] > 50 * 2**20 for n in trainers)
        assert all(s.labels["role"] == "worker" for s in values["flow_nexus_node_heartbeat_age_seconds"])
        session = {s.name: s.value for s in (*values["flow_nexus_session_epoch"], *values["flow_nexus_session_loss"],
                                              *values["flow_nexus_session_accuracy"],
                                              *values["flow_nexus_session_samples_per_second"])
                   if s.labels["session_id"] == run.session_id}
        assert session["flow_nexus_session_epoch"] >= 2 and session["flow_nexus_session_loss"] > 0
        assert 0 < session["flow_nexus_session_accuracy"] <= 1 and session["flow_nexus_session_samples_per_second"] > 0
        assert values["flow_nexus_sessions_running"][0].value == 1

        # The controller goes away and leaves its nodes running.
        clients = {n.id: node_client(first, n) for n in (*trainers, repointed)}
        training.close()
        first.close(stop_nodes=False)
        gone_at = time.monotonic()

        # A new controller takes R's node over.
        second = ClusterService(settings)
        assert clients[repointed.id].lease(p.LeaseRequest(controller_url=second.telemetry.url)).node_id == repointed.id
        bad = httpx.post(f"http://{repointed.host}:{repointed.port}/lease", json={"controller_url": "ftp://x"},
                         headers={"Authorization": f"Bearer {second.get_cluster(repointed_id).token}"})
        assert bad.status_code == 400 and "controller_url" in bad.json()["error"]

        wait_for(lambda: not pid_alive(idle.pid), GRACE_S + 15, "the idle node stopping itself")
        log = (Path(idle.sandbox) / "node.log").read_text()
        assert "stops itself" in log and "lease grace" in log
        time.sleep(max(0.0, GRACE_S + 3 - (time.monotonic() - gone_at)))
        epochs = [clients[n.id].training_status(1 << 62).epoch for n in trainers]
        time.sleep(1.5)
        assert all(pid_alive(n.pid) for n in trainers), "a node with a running job stopped without its controller"
        assert [clients[n.id].training_status(1 << 62).epoch for n in trainers] > epochs, "training did not go on"
        assert pid_alive(repointed.pid)
        report = second.telemetry.report(repointed.id)
        assert report is not None and time.time() - report.seen < 3, "the re-pointed node does not push here"

        for n in trainers:  # the job ends: now the grace counts
            clients[n.id].stop_training()
        wait_for(lambda: not any(pid_alive(n.pid) for n in trainers), GRACE_S + 20, "the trainers stopping")
        assert pid_alive(repointed.pid)
        assert second.terminate(repointed_id).success
    finally:
        training.close()
        first.close(stop_nodes=False)
        if second is not None:
            second.close()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_listener_checks_the_token_before_the_body_and_answers_short_json():
    from flow_nexus_server.service.telemetry import Directory, Telemetry

    token = "t" * 64
    telemetry = Telemetry(Directory(lambda cid: token if cid == "c1" else None,
                                    lambda cid, nid: (cid, nid) == ("c1", "n1")))
    url = f"{telemetry.url}{p.TELEMETRY_PATH}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(timeout=10) as http:
            # A wrong token is refused from the headers: the (announced) huge body is never awaited.
            host, port = telemetry.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                raw.sendall(f"POST {p.TELEMETRY_PATH}/c1/n1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                            f"Content-Length: {1 << 30}\r\n\r\n".encode())
                answer = raw.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 401") and '"error": "missing or wrong cluster token' in answer
            assert http.post(f"{url}/c2/n1", headers=auth, json={}).status_code == 401  # not this cluster's token
            assert http.post(f"{url}/c1/n2", headers=auth, json={}).status_code == 404  # not a live node
            big = http.post(f"{url}/c1/n1", headers=auth, content=b"x" * (5 << 20))
            assert big.status_code == 413 and "MiB" in big.json()["error"]
            bad = http.post(f"{url}/c1/n1", headers=auth, content=b"{}")
            assert bad.status_code == 400 and bad.json()["error"].startswith("invalid telemetry push: health")
            assert http.get(f"{url}/c1/n1", headers=auth).status_code == 404
            health = p.HealthReply(node_id="n1", cluster_id="c1", role="worker", pid=1, rss_bytes=1 << 20, uptime_s=1,
                                   torch_threads=1, time=time.time())
            push = p.TelemetryPush(health=health, progress=p.TrainProgress(session_id=None, state="idle"), cursor=7)
            taken = http.post(f"{url}/c1/n1", headers=auth, content=push.model_dump_json())
            assert taken.status_code == 200 and taken.json() == {"cursor": 7}  # no session follows it: as pushed
        report = telemetry.report("n1")
        assert report is not None and report.cluster_id == "c1" and report.health.rss_bytes == 1 << 20
    finally:
        telemetry.close()
