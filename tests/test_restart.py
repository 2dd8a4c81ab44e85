"""Kill the server with SIGKILL, start it again on the same state home: nothing is forgotten."""

from __future__ import annotations

from conftest import StdioRpc, pid_alive, start_server


def test_restart_reattaches_live_nodes_and_marks_dead_ones(home):
    first = start_server(home)
    try:
        rpc = StdioRpc(first)
        rpc.initialize()
        cid = rpc.tool("neural_cluster_init", {"name": "survivor"})["cluster_id"]
        nodes = rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 3})["nodes"]
        rpc.tool("neural_cluster_connect", {"cluster_id": cid})
    finally:
        first.kill()  # no clean-up runs: the nodes live on
        first.wait(timeout=30)
    pids = [n["pid"] for n in nodes]
    assert all(pid_alive(p) for p in pids)
    import os
    import signal

    os.killpg(pids[2], signal.SIGKILL)  # one node dies while no server watches

    second = start_server(home)
    try:
        rpc = StdioRpc(second)
        rpc.initialize()
        listed = rpc.tool("neural_cluster_list", {})
        assert [c["cluster_id"] for c in listed["clusters"]] == [cid]
        status = rpc.tool("neural_cluster_status", {"cluster_id": cid})
        by_id = {n["node_id"]: n for n in status["nodes"]}
        assert [by_id[n["node_id"]]["alive"] for n in nodes] == [True, True, False]
        assert by_id[nodes[2]["node_id"]]["status"] == "lost"
        assert status["group_state"] == "needs_connect"
        # The survivors re-form through the restarted rendezvous store.
        conn = rpc.tool("neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 2
        term = rpc.tool("neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 2
    finally:
        second.kill()
        second.wait(timeout=30)
    assert not any(pid_alive(p) for p in pids)
