"""A scripted JSON-RPC client over stdio; SIGTERM to the server stops every node it started."""

from __future__ import annotations

import json
import signal
import subprocess

from conftest import pid_alive, server_command, server_env


class StdioRpc:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.next_id = 0

    def send(self, method: str, params: dict | None = None, notify: bool = False) -> dict | None:
        msg: dict = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self.next_id += 1
            msg["id"] = self.next_id
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        if notify:
            return None
        while True:  # skip notifications until our answer arrives
            line = self.proc.stdout.readline()
            assert line, "server closed stdout"
            reply = json.loads(line)  # every stdout line must be JSON-RPC
            if reply.get("id") == self.next_id:
                return reply

    def tool(self, name: str, args: dict) -> dict:
        reply = self.send("tools/call", {"name": name, "arguments": args})
        result = reply["result"]
        assert not result.get("isError"), result
        return result["structuredContent"]


def test_sigterm_stops_the_nodes(home):
    proc = subprocess.Popen([server_command()], env=server_env(home), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        rpc = StdioRpc(proc)
        init = rpc.send("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                       "clientInfo": {"name": "script", "version": "1"}})
        assert init["result"]["serverInfo"]["name"] == "flow-nexus-server"
        rpc.send("notifications/initialized", notify=True)
        cid = rpc.tool("neural_cluster_init", {"name": "sigterm"})["cluster_id"]
        pids = [n["pid"] for n in rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 2})["nodes"]]
        assert all(pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(pid_alive(p) for p in pids), "nodes outlived the server"
