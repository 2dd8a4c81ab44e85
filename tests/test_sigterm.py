"""A scripted JSON-RPC client over stdio: the front-end owns nothing, so SIGTERM, closing stdin or
both at once end that process only; the nodes and the database stay true."""

from __future__ import annotations

import json
import signal
import subprocess

from conftest import StdioRpc, controller_pid, pid_alive, server_command, server_env


def cli_status(home) -> dict:
    proc = subprocess.run([server_command(), "--home", str(home), "status", "--json"], env=server_env(home),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sigterm_leaves_the_nodes_to_the_controller(home):
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
    assert all(pid_alive(p) for p in pids), "a front-end's SIGTERM stopped nodes"
    view = cli_status(home)
    assert view["controller_pid"] == controller_pid(home)
    [cluster] = view["clusters"]
    assert cluster["cluster_id"] == cid and sorted(n["pid"] for n in cluster["nodes"]) == sorted(pids)
    assert {n["status"] for n in cluster["nodes"]} == {"running"}

    stop = subprocess.run([server_command(), "--home", str(home), "stop", cid], env=server_env(home),
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and f"stopped cluster {cid}" in stop.stdout, stop
    assert not any(pid_alive(p) for p in pids)


def test_stdin_close_and_sigterm_together_twenty_times(home):
    """Hosts close stdin and send SIGTERM two seconds later, or at once: every round leaves the
    cluster's nodes alive and recorded as running, and nothing else behind."""
    pids: list[int] = []
    cid = None
    for round_ in range(20):
        proc = subprocess.Popen([server_command()], env=server_env(home), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        rpc = StdioRpc(proc)
        rpc.initialize()
        if cid is None:
            cid = rpc.tool("neural_cluster_init", {"name": "storm"})["cluster_id"]
        if round_ % 5 == 0:
            pids += [n["pid"] for n in rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 1})["nodes"]]
        else:
            rpc.tool("neural_cluster_status", {"cluster_id": cid})
        proc.stdin.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    [cluster] = cli_status(home)["clusters"]
    assert sorted(n["pid"] for n in cluster["nodes"]) == sorted(pids)
    assert {n["status"] for n in cluster["nodes"]} == {"running"}
    stop = subprocess.run([server_command(), "--home", str(home), "stop", "--all"], env=server_env(home),
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop
    assert not any(pid_alive(p) for p in pids)
    assert cli_status(home)["clusters"] == []
