"""A node killed with SIGKILL mid-session: detected, reported, and healed when auto_healing is on."""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest
from conftest import ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio

TRAIN = {"dataset": "digits", "epochs": 40, "batch_size": 32, "learning_rate": 0.01, "checkpoint_every": 3}


async def three_workers(client: Client, auto_healing: bool) -> tuple[str, dict[str, int]]:
    cid = (await ok(client, "neural_cluster_init", {"name": "faults", "architecture": "mlp",
                                                     "auto_healing": auto_healing}))["cluster_id"]
    nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 3}))["nodes"]
    await ok(client, "neural_cluster_connect", {"cluster_id": cid})
    return cid, {n["node_id"]: n["pid"] for n in nodes}


async def kill_mid_session(client: Client, cid: str, pid: int, after_epoch: int = 4) -> float:
    for _ in range(600):
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        if (status.get("current_epoch") or 0) >= after_epoch:
            break
        await anyio.sleep(0.05)
    assert status["training"]["status"] == "running", "the session ended before the kill"
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


async def test_auto_healing_replaces_the_node_and_finishes(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, pids = await three_workers(client, auto_healing=True)
        victim = list(pids)[1]
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, **TRAIN})
        await kill_mid_session(client, cid, pids[victim])
        done = None
        for _ in range(600):
            done = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
            if done["status"] != "running":
                break
            await anyio.sleep(0.5)
        assert done["status"] == "completed", done.get("error")
        assert done["live"]["restarts"] == 1
        assert done["final_metrics"]["val_accuracy"] >= 0.93
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        states = {n["node_id"]: n["status"] for n in status["nodes"]}
        assert states[victim] == "failed" and sum(s == "running" for s in states.values()) == 3
        events = await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"], "wait_s": 0,
                                                                  "limit": 500})
        assert "session_healed" in [e["kind"] for e in events["events"]]
        live_pids = [n["pid"] for n in status["nodes"] if n["status"] == "running"]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert not any(pid_alive(p) for p in live_pids)


async def test_without_healing_the_session_fails_naming_the_node(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, pids = await three_workers(client, auto_healing=False)
        victim = list(pids)[2]
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, **TRAIN})
        killed_at = await kill_mid_session(client, cid, pids[victim])
        for _ in range(240):
            done = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
            if done["status"] != "running":
                break
            await anyio.sleep(0.25)
        assert done["status"] == "failed" and victim in done["error"]
        assert time.monotonic() - killed_at < 60
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert {n["node_id"]: n["status"] for n in status["nodes"]}[victim] == "failed"
        # The survivors are ready for a new session at once.
        again = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 10,
                                                               "learning_rate": 0.01, "wait": True})
        assert again["status"] == "completed" and again["nodes_training"] == 2
        assert again["result"]["metrics"]["val_accuracy"] >= 0.9
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
