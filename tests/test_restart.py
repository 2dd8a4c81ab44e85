"""Kill the controller with SIGKILL: the next front-end starts a new one on the same state home,
which re-attaches the live nodes and marks the dead one lost; nothing is forgotten."""

from __future__ import annotations

import os
import signal
import time

from conftest import StdioRpc, controller_pid, pid_alive, start_server


def test_a_killed_controller_is_replaced_and_reattaches_live_nodes(home):
    first = start_server(home)
    try:
        rpc = StdioRpc(first)
        rpc.initialize()
        cid = rpc.tool("neural_cluster_init", {"name": "survivor"})["cluster_id"]
        nodes = rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 3})["nodes"]
        rpc.tool("neural_cluster_connect", {"cluster_id": cid})
        old = controller_pid(home)
        assert old is not None and old != first.pid, "the stdio server should be a front-end of a controller"
        os.kill(old, signal.SIGKILL)  # no clean-up runs: the nodes live on
        deadline = time.monotonic() + 30
        while pid_alive(old) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.wait(timeout=30) == 0, "the front-end should end with its controller"
    finally:
        if first.poll() is None:
            first.kill()
    pids = [n["pid"] for n in nodes]
    assert all(pid_alive(p) for p in pids)
    os.killpg(pids[2], signal.SIGKILL)  # one node dies while no controller watches

    second = start_server(home)
    try:
        rpc = StdioRpc(second)
        rpc.initialize()
        assert controller_pid(home) not in (None, old)
        listed = rpc.tool("neural_cluster_list", {})
        assert [c["cluster_id"] for c in listed["clusters"]] == [cid]
        status = rpc.tool("neural_cluster_status", {"cluster_id": cid})
        by_id = {n["node_id"]: n for n in status["nodes"]}
        assert [by_id[n["node_id"]]["alive"] for n in nodes] == [True, True, False]
        assert by_id[nodes[2]["node_id"]]["status"] == "lost"
        assert status["group_state"] == "needs_connect"
        conn = rpc.tool("neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 2
        term = rpc.tool("neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 2
    finally:
        second.kill()
        second.wait(timeout=30)
    assert not any(pid_alive(p) for p in pids)
