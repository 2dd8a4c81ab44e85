"""The durable control plane, through real front-end processes (the SDK's stdio client spawns
`flow-nexus-server`): clusters and training outlive the front-ends, and the controller itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from conftest import controller_pid, err, ok, pid_alive, server_command, server_env
from mcp import Client, StdioServerParameters

pytestmark = pytest.mark.anyio

TRAIN = {"dataset": "digits", "epochs": 40, "batch_size": 32, "learning_rate": 0.05, "architecture": "mlp",
         "federated": False}


def params(home: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=server_command(), env={**server_env(home), **env})


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([server_command(), "--home", str(home), *args], env=server_env(home),
                          capture_output=True, text=True, timeout=180)


def cli_status(home: Path) -> dict:
    proc = cli(home, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def start_training(home: Path, name: str) -> tuple[str, str, list[int]]:
    """A 2-worker cluster training digits; the front-end that started it is closed on return."""
    async with Client(params(home), read_timeout_seconds=120) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": name, "architecture": "mlp"}))["cluster_id"]
        pids = [n["pid"] for n in (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        sid = (await ok(client, "neural_train_distributed", {"cluster_id": cid, **TRAIN}))["session_id"]
        deadline = time.monotonic() + 60
        while ((await ok(client, "neural_training_status", {"session_id": sid})).get("live") or {}).get("epoch", 0) < 1:
            assert time.monotonic() < deadline, "training did not start"
            await anyio.sleep(0.5)
    return cid, sid, pids


async def wait_completed(home: Path, sid: str, timeout: float = 300) -> dict:
    async with Client(params(home), read_timeout_seconds=120) as client:
        started = time.monotonic()
        first = await ok(client, "neural_training_status", {"session_id": sid})
        assert time.monotonic() - started < 5, "a new front-end took too long to answer status"
        deadline = time.monotonic() + timeout
        status = first
        while status["status"] == "running":
            assert time.monotonic() < deadline, f"session still running: {status['live']}"
            await anyio.sleep(1)
            status = await ok(client, "neural_training_status", {"session_id": sid})
        return {"first": first, "last": status}


async def test_training_outlives_the_front_end_that_started_it(home):
    cid, sid, pids = await start_training(home, "outlives")
    assert all(pid_alive(p) for p in pids), "closing the front-end stopped nodes"
    seen = await wait_completed(home, sid)
    assert seen["first"]["status"] == "running" and seen["first"]["live"]["epoch"] >= 1
    assert seen["last"]["status"] == "completed", seen["last"]
    assert seen["last"]["final_metrics"]["val_accuracy"] > 0.9
    async with Client(params(home), read_timeout_seconds=120) as client:
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert not any(pid_alive(p) for p in pids)


async def test_training_survives_a_controller_sigkill(home):
    cid, sid, pids = await start_training(home, "survives")
    old = controller_pid(home)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    while pid_alive(old):
        await anyio.sleep(0.05)
    assert all(pid_alive(p) for p in pids), "the controller's death stopped nodes"
    seen = await wait_completed(home, sid)  # this front-end starts a new controller
    assert controller_pid(home) not in (None, old)
    assert seen["last"]["status"] == "completed", seen["last"]
    assert seen["last"]["final_metrics"]["val_accuracy"] > 0.9
    assert cli(home, "stop", cid).returncode == 0
    assert not any(pid_alive(p) for p in pids)


async def test_two_clients_see_one_truth(home):
    async with Client(params(home), read_timeout_seconds=120) as one, \
            Client(params(home), read_timeout_seconds=120) as two:
        cid = (await ok(one, "neural_cluster_init", {"name": "shared"}))["cluster_id"]
        listed = await ok(two, "neural_cluster_list", {})
        assert [c["cluster_id"] for c in listed["clusters"]] == [cid]
        node = (await ok(two, "neural_node_deploy", {"cluster_id": cid}))["nodes"][0]
        status = await ok(one, "neural_cluster_status", {"cluster_id": cid})
        assert [(n["node_id"], n["pid"]) for n in status["nodes"]] == [(node["node_id"], node["pid"])]
        assert cli_status(home)["frontends"] == 2
        await ok(one, "neural_cluster_terminate", {"cluster_id": cid})
        assert "already terminated" in await err(two, "neural_cluster_terminate", {"cluster_id": cid})


async def test_an_idle_cluster_stops_itself_and_the_controller_leaves(home):
    async with Client(params(home), read_timeout_seconds=120) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "idle", "idle_timeout_min": 0.1}))["cluster_id"]
        pids = [n["pid"] for n in (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]]
        keep = (await ok(client, "neural_cluster_init", {"name": "never", "idle_timeout_min": 0}))["cluster_id"]
        kept = [n["pid"] for n in (await ok(client, "neural_node_deploy", {"cluster_id": keep}))["nodes"]]
    ctrl = controller_pid(home)
    deadline = time.monotonic() + 120
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, "the idle cluster's nodes still run after two minutes"
        await anyio.sleep(0.5)
    view = cli_status(home)
    assert [c["cluster_id"] for c in view["clusters"]] == [keep]  # idle_timeout_min 0: never
    assert all(pid_alive(p) for p in kept) and view["controller_pid"] == ctrl
    assert cli(home, "stop", keep).returncode == 0
    deadline = time.monotonic() + 60
    while pid_alive(ctrl):  # no live cluster and no front-end: the controller goes too
        assert time.monotonic() < deadline, "the controller did not leave"
        await anyio.sleep(0.2)
    assert not any(pid_alive(p) for p in kept)


async def test_one_process_per_call_like_the_inspector_cli(home):
    """The MCP Inspector CLI starts one server process per call: state lives in the controller."""

    async def one_call(tool: str, args: dict) -> dict:
        async with Client(params(home), read_timeout_seconds=300) as client:
            return await ok(client, tool, args)

    cid = (await one_call("neural_cluster_init", {"name": "inspector", "architecture": "mlp"}))["cluster_id"]
    pids = [n["pid"] for n in (await one_call("neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]]
    assert (await one_call("neural_cluster_connect", {"cluster_id": cid}))["nodes_connected"] == 2
    train = await one_call("neural_train_distributed", {"cluster_id": cid, **TRAIN, "epochs": 3, "wait": True})
    assert train["result"]["status"] == "completed", train
    status = await one_call("neural_cluster_status", {"cluster_id": cid})
    assert [n["alive"] for n in status["nodes"]] == [True, True]
    pred = await one_call("neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps([[0.0] * 64])})
    assert pred["examples"] == 1 and pred["nodes_used"] == 2
    assert (await one_call("neural_cluster_terminate", {"cluster_id": cid}))["success"]
    assert not any(pid_alive(p) for p in pids)


async def test_an_in_process_server_leaves_no_session_running(home):
    """In-process (no controller), closing the server stops its nodes: the running session ends
    'stopped' and the cluster 'terminated' in the store, not 'running'."""
    from flow_nexus_server.config import Settings
    from flow_nexus_server.server import build_server
    from flow_nexus_server.store import Cluster, Store, TrainingSession

    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "closing", "architecture": "mlp"}))["cluster_id"]
        pids = [n["pid"] for n in (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["nodes"]]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        sid = (await ok(client, "neural_train_distributed", {"cluster_id": cid, **TRAIN}))["session_id"]
    assert not any(pid_alive(p) for p in pids)
    store = Store(Settings.from_env(home).db_url)
    try:
        with store.session() as s:
            assert s.get(TrainingSession, sid).status == "stopped"
            assert s.get(Cluster, cid).status == "terminated"
    finally:
        store.close()
