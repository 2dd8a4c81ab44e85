"""raft through the tools: the leader dies, a survivor leads a new term from the last committed version."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from conftest import ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def test_leader_loss_moves_to_a_new_term(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "raft", "topology": "star", "architecture": "mlp",
                                                         "consensus": "raft"}))["cluster_id"]
        leader = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"}))["nodes"][0]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 3})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 40, "batch_size": 32,
            "learning_rate": 0.01})
        for _ in range(400):
            live = (await ok(client, "neural_cluster_status", {"cluster_id": cid}))["training"]
            if live["consensus"].get("raft_commit_index", 0) >= 3:
                break
            await anyio.sleep(0.05)
        committed_before = live["consensus"]["raft_commit_index"]
        assert live["status"] == "running" and live["consensus"]["raft_term"] == 1
        os.kill(leader["pid"], signal.SIGKILL)
        for _ in range(600):
            done = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
            if done["status"] != "running":
                break
            await anyio.sleep(0.5)
        assert done["status"] == "completed", done.get("error")
        assert done["live"]["restarts"] == 1 and done["live"]["consensus"]["raft_term"] == 2
        assert done["live"]["consensus"]["raft_commit_index"] == 40  # continued from the committed round
        assert committed_before >= 3
        assert done["final_metrics"]["val_accuracy"] >= 0.9
        events = await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"], "wait_s": 0,
                                                                  "limit": 500})
        changed = [e for e in events["events"] if e["kind"] == "raft_leader_changed"]
        assert len(changed) == 1 and changed[0]["data"]["term"] == 2 and changed[0]["data"]["resume_from"]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
