"""The rendezvous store lives on the cluster's first node, so training outlives the controller."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import anyio
import psutil
import pytest
from conftest import ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.controller.core import Controller
from flow_nexus_server.server import build_server
from flow_nexus_server.service import rendezvous
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.node_client import NodeClient, NodeRequestError
from flow_nexus_server.service.rendezvous import ADVERTISE_ENV, BIND_ENV
from workers import protocol

pytestmark = pytest.mark.anyio


def test_a_first_node_on_this_host_binds_where_the_other_machines_reach_it(monkeypatch, tmp_path):
    def store_request(host, port):  # the settings as a server started now reads them
        return rendezvous.store_request(host, port, Settings.from_env(tmp_path))

    monkeypatch.delenv(ADVERTISE_ENV, raising=False)
    assert store_request("127.0.0.1", 5000) == protocol.StoreRequest(port=5000)  # where its control API listens
    monkeypatch.setenv(ADVERTISE_ENV, "10.1.2.3")
    monkeypatch.delenv(BIND_ENV, raising=False)
    assert store_request("127.0.0.1", None) == protocol.StoreRequest(bind_host="0.0.0.0", advertise_host="10.1.2.3")
    monkeypatch.setenv(BIND_ENV, "10.1.2.3")
    assert store_request("127.0.0.1", None).bind_host == "10.1.2.3"
    assert store_request("10.9.9.9", None) == protocol.StoreRequest()  # an actor on another machine: its own address


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def serves_a_store(address: str, port: int) -> bool:
    """True when a c10d TCPStore answers on this address."""
    import torch.distributed as dist

    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address
    try:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=3))
        client.check(["probe"])
        return True
    except Exception:
        return False


def store_address(svc: ClusterService, cluster_id: str) -> tuple[str, int]:
    cluster = svc.store.cluster(cluster_id)
    assert cluster.store_host and cluster.store_port, "the cluster row holds no store address"
    return cluster.store_host, cluster.store_port


def host_pid(port: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` listen on ``port``."""
    return [pid for pid in pids if pid_alive(pid) and any(bound == port for _, bound in listening_ports(pid))]


async def test_store_lives_on_the_first_node_and_moves_when_it_dies(home):
    settings = Settings.from_env(home)
    svc = ClusterService(settings)
    async with Client(build_server(settings, service=svc)) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "rdzv", "architecture": "mlp"}))["cluster_id"]
        nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 3}))["nodes"]
        pid_of = {n["node_id"]: n["pid"] for n in nodes}
        conn = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        first = conn["ranks"][0]["node_id"]

        # (a) the first node in rank order listens on the store's port, the controller (this process) does not.
        host, port = store_address(svc, cid)
        assert host_pid(port, list(pid_of.values())) == [pid_of[first]]
        assert port not in {bound for _, bound in listening_ports(os.getpid())}
        assert serves_a_store(host, port)

        # A request the node cannot serve gets a sentence back and leaves its store as it was.
        node = svc.client(svc.get_cluster(cid), svc.get_node(first))
        with pytest.raises(NodeRequestError, match="cannot host the rendezvous store"):
            node.host_store(protocol.StoreRequest(bind_host="192.0.2.1"))  # TEST-NET-1: no address of this machine
        assert node.host_store(protocol.StoreRequest()) == protocol.StoreReply(host=host, port=port, reused=True)

        # Asked again (a new generation over the same nodes), the first node hands out the same store.
        again = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert again["generation"] > conn["generation"]
        assert store_address(svc, cid) == (host, port)

        # (c) the first node dies: the next connect forms a generation whose store is on the new first node.
        os.kill(pid_of[first], signal.SIGKILL)
        for _ in range(300):
            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            if status["group_state"] == "needs_connect":
                break
            await anyio.sleep(0.1)
        assert status["group_state"] == "needs_connect", status["group_message"]
        moved = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        new_first = moved["ranks"][0]["node_id"]
        assert moved["generation"] > again["generation"] and moved["nodes_connected"] == 2
        assert new_first != first
        _, new_port = store_address(svc, cid)
        assert host_pid(new_port, [pid_of[n] for n in pid_of if n != first]) == [pid_of[new_first]]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert not any(pid_alive(pid) for pid in pid_of.values())


async def wait_for_node_state(client: NodeClient, states: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = (await anyio.to_thread.run_sync(client.training_status)).state
        if state in states:
            return state
        await anyio.sleep(0.2)
    return state


async def test_training_completes_after_the_controller_dies(home):
    settings = Settings.from_env(home)
    first = Controller(settings)
    await first.start()
    pids: list[int] = []
    try:
        async with Client(build_server(controller=first)) as client:
            cid = (await ok(client, "neural_cluster_init", {"name": "survives", "architecture": "mlp"}))["cluster_id"]
            nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]
            pids = [n["pid"] for n in nodes]
            await ok(client, "neural_cluster_connect", {"cluster_id": cid})
            run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 30,
                                                                "batch_size": 32, "learning_rate": 0.01})
            assert run["config"]["mode"] == "sync"
            cluster = first.clusters.get_cluster(cid)
            node_clients = [first.clusters.client(cluster, first.clusters.get_node(n["node_id"])) for n in nodes]
            store = store_address(first.clusters, cid)
            # The controller dies as the session starts, without stopping the nodes: every store use of
            # the session (setup barriers, sub-groups, heartbeats, its end) comes after it.
            await first.aclose(stop_nodes=False)
        for node in node_clients:  # still at work (30 epochs take several seconds), not finished already
            assert (await anyio.to_thread.run_sync(node.training_status)).state in ("preparing", "running")
        assert all(pid_alive(pid) for pid in pids)
        assert serves_a_store(*store), "the store must still take new connections (a re-form needs them)"
        for node in node_clients:
            assert await wait_for_node_state(node, {"completed", "failed", "stopped"}, 240) == "completed"

        # A new controller re-attaches the nodes and reports the session completed, with its metrics.
        async with Client(build_server(settings)) as client:
            for _ in range(300):
                done = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
                if done["status"] != "running":
                    break
                await anyio.sleep(0.2)
            assert done["status"] == "completed", done.get("error")
            assert done["final_metrics"]["val_accuracy"] >= 0.9
            await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        await first.aclose(stop_nodes=False)
        for pid in pids:  # a failed assertion above must not leave nodes behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
