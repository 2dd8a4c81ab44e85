"""End to end over stdio: the official MCP client spawns `flow-nexus-server` and drives real nodes."""

from __future__ import annotations

import pytest
from conftest import err, ok, pid_alive, server_command, server_env
from mcp import Client, StdioServerParameters

from flow_nexus_server.service.backend import gpus_visible_here


def cuda_devices() -> int:
    """What the nodes' torch (this venv's) sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = pytest.mark.anyio


async def test_full_lifecycle_over_stdio(home):
    params = StdioServerParameters(command=server_command(), env=server_env(home))
    async with Client(params, read_timeout_seconds=120) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name in ("neural_cluster_init", "neural_node_deploy", "neural_cluster_connect",
                     "neural_cluster_status", "neural_cluster_list", "neural_node_remove",
                     "neural_node_logs", "neural_cluster_terminate"):
            assert tools[name].input_schema["type"] == "object"
            assert tools[name].output_schema is not None, f"{name} has no output schema"
        assert tools["neural_cluster_status"].annotations.read_only_hint
        assert tools["neural_cluster_terminate"].annotations.destructive_hint

        init = await ok(client, "neural_cluster_init", {"name": "e2e", "topology": "mesh", "max_nodes": 8})
        cid = init["cluster_id"]
        assert cid.startswith("dnc_") and init["status"] == "initializing"
        assert init["backend"] == "auto"  # decided at connect, from the GPUs the nodes see

        deploy = await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 3})
        assert [n["status"] for n in deploy["nodes"]] == ["deployed"] * 3
        node_ids = [n["node_id"] for n in deploy["nodes"]]

        conn = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 3 and conn["generation"] == 1
        assert {(e["from"], e["to"]) for e in conn["edges"]} == {(0, 1), (0, 2), (1, 2)}
        assert all(e["latency_ms"] > 0 and e["bandwidth_mbps"] > 0 for e in conn["edges"])
        assert conn["backend"] == ("nccl" if cuda_devices() else "gloo")

        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        nodes = status["nodes"]
        assert [n["alive"] for n in nodes] == [True] * 3
        pids = [n["pid"] for n in nodes]
        assert len(set(pids)) == 3 and all(pid_alive(p) for p in pids)
        assert sorted(n["rank"] for n in nodes) == [0, 1, 2]
        assert all(n["rss_mb"] > 10 and n["heartbeat_age_s"] < 30 for n in nodes)
        assert status["group_state"] == "formed" and status["generation"] == 1
        assert status["backend"] == conn["backend"]
        if conn["backend"] == "gloo":  # each node says where it computes and what it sees
            assert all(n["metrics"]["device"] == "cpu" for n in nodes)
            assert all(n["metrics"]["cuda_devices"] == cuda_devices() for n in nodes)

        ring = await ok(client, "neural_cluster_connect", {"cluster_id": cid, "topology": "ring"})
        assert [(e["from"], e["to"]) for e in ring["edges"]] == [(0, 1), (1, 2), (2, 0)]
        assert ring["generation"] == 2
        tree = await ok(client, "neural_cluster_connect", {"cluster_id": cid, "topology": "hierarchical"})
        assert [(e["from"], e["to"]) for e in tree["edges"]] == [(0, 1), (0, 2)]

        # Bad calls: readable errors, and the server keeps serving.
        assert "cluster_id" in await err(client, "neural_cluster_status", {})
        assert "cube" in await err(client, "neural_cluster_init", {"name": "x", "topology": "cube"})
        missing = await err(client, "neural_cluster_status", {"cluster_id": "dnc_nope"})
        assert "dnc_nope" in missing and "does not exist" in missing
        too_many = await err(client, "neural_node_deploy", {"cluster_id": cid, "count": 6})
        assert "max_nodes" in too_many
        if not gpus_visible_here():  # neither nccl nor GPU nodes can be had here: say so, start nothing
            nccl = await err(client, "neural_cluster_init", {"name": "g", "backend": "nccl"})
            assert "backend 'nccl' needs a CUDA device" in nccl and "'auto'" in nccl
            gpus = await err(client, "neural_node_deploy", {"cluster_id": cid, "num_gpus": 1})
            assert "num_gpus 1" in gpus and "no GPU" in gpus

        logs = await ok(client, "neural_node_logs", {"node_id": node_ids[0], "tail": 20})
        assert "listening" in logs["log"] and logs["lines"] <= 20

        # Removing a node from a connected cluster re-forms the group as a new generation.
        removed = await ok(client, "neural_node_remove", {"node_id": node_ids[2]})
        assert removed["process_gone"] and removed["group"]["action"] == "reformed"
        gone_pid = removed["pid"]
        assert not pid_alive(gone_pid)
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        live = [n for n in status["nodes"] if n["status"] == "running"]
        assert len(live) == 2 and sorted(n["rank"] for n in live) == [0, 1]
        assert status["generation"] == removed["group"]["generation"]

        listed = await ok(client, "neural_cluster_list", {})
        assert any(c["cluster_id"] == cid and c["nodes"] == 2 for c in listed["clusters"])

        term = await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 2
        assert not any(pid_alive(p) for p in pids)
        again = await err(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert "already terminated" in again
        after = await err(client, "neural_node_deploy", {"cluster_id": cid})
        assert "terminated" in after and "neural_cluster_init" in after


async def test_closing_stdio_leaves_the_cluster_to_the_next_client(home):
    params = StdioServerParameters(command=server_command(), env=server_env(home))
    async with Client(params, read_timeout_seconds=120) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "kept"}))["cluster_id"]
        deploy = await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        pids = [n["pid"] for n in deploy["nodes"]]
        assert all(pid_alive(p) for p in pids)
    assert all(pid_alive(p) for p in pids), "closing a front-end stopped nodes"
    async with Client(params, read_timeout_seconds=120) as client:
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert sorted(n["pid"] for n in status["nodes"] if n["alive"]) == sorted(pids)
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert not any(pid_alive(p) for p in pids)
