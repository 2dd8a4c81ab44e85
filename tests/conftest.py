"""Shared fixtures: a throw-away state home and helpers to look at real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def server_command() -> str:
    """The installed console script beside this interpreter."""
    script = Path(sys.executable).with_name("flow-nexus-server")
    assert script.exists(), "install the package first: pip install -e '.[test]'"
    return str(script)


def server_env(home: Path) -> dict[str, str]:
    return {"FLOW_NEXUS_HOME": str(home), "PATH": os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": "1"}


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

    def initialize(self) -> dict:
        init = self.send("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                        "clientInfo": {"name": "script", "version": "1"}})
        self.send("notifications/initialized", notify=True)
        return init["result"]

    def tool(self, name: str, args: dict) -> dict:
        reply = self.send("tools/call", {"name": name, "arguments": args})
        result = reply["result"]
        assert not result.get("isError"), result
        return result["structuredContent"]


def start_server(home: Path) -> subprocess.Popen:
    return subprocess.Popen([server_command()], env=server_env(home), text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
