"""A scripted JSON-RPC client over stdio; SIGTERM to the server stops every node it started."""

from __future__ import annotations

import signal
import subprocess

from conftest import StdioRpc, pid_alive, server_command, server_env


def test_sigterm_stops_the_nodes(home):
    proc = subprocess.Popen([server_command()], env=server_env(home), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        rpc = StdioRpc(proc)
        assert rpc.initialize()["serverInfo"]["name"] == "flow-nexus-server"
        cid = rpc.tool("neural_cluster_init", {"name": "sigterm"})["cluster_id"]
        pids = [n["pid"] for n in rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 2})["nodes"]]
        assert all(pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(pid_alive(p) for p in pids), "nodes outlived the server"
