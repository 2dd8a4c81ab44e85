"""Shared fixtures: a throw-away state home and helpers to look at real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
_ENV_AT_IMPORT = frozenset(os.environ)  # what the test run began with


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path):
    """A throw-away state home. Afterwards every cluster a controller still runs there is stopped
    and the controller ends: tests that start stdio or HTTP front-ends leave nothing behind."""
    path = tmp_path / "home"
    yield path
    stop_controller(path)


def controller_pid(home: Path) -> int | None:
    """The pid of the home's running controller (from its lock file), or None."""
    if not (home / "controller.sock").exists():
        return None
    try:
        pid = int((home / "controller.lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def stop_controller(home: Path, timeout: float = 120.0) -> None:
    """``flow-nexus-server stop --all`` on the home when a controller runs there; waits for it to end."""
    import time

    pid = controller_pid(home)
    if pid is None:
        return
    subprocess.run([server_command(), "--home", str(home), "stop", "--all"], env=server_env(home),
                   capture_output=True, timeout=timeout)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def shutdown_in_process_ray() -> None:
    """An in-memory server given launcher 'ray' (the fuzzer draws it) joins or starts Ray inside the
    test process; that connection, and the instance it started, would outlive the test and capture
    every later ``ray.init`` in the process (ignore_reinit_error), so later Ray tests would talk to
    the wrong cluster."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for name in [k for k in os.environ if k.startswith("RAY_") and k not in _ENV_AT_IMPORT]:
        del os.environ[name]  # ray.init leaves RAY_AUTH_MODE & co. behind; server subprocesses inherit them


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
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


# --------------------------------------------------------------------------- HTTP transport helpers

def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    """`flow-nexus-server --transport http` as a child process, ready once /healthz answers."""

    def __init__(self, home: Path, token: str | None, *extra: str, port: int | None = None) -> None:
        import subprocess

        self.home, self.token = home, token
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/mcp"
        env = server_env(home)
        if token is not None:
            env["FLOW_NEXUS_TOKEN"] = token
        home.parent.mkdir(parents=True, exist_ok=True)
        self.stdout_path = home.parent / f"http-server-{self.port}.stdout"
        self.stderr_path = home.parent / f"http-server-{self.port}.stderr"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [server_command(), "--transport", "http", "--port", str(self.port), *extra],
            env=env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> HttpServer:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"/healthz did not answer within {timeout} s:\n{self.stderr()}")

    def stop(self, sig: int | None = None, timeout: float = 60.0) -> int:
        """Send `sig` (SIGTERM by default) and wait; kill it if it does not go."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode


@pytest.fixture
def http_server(home: Path):
    """A running HTTP server with a random bearer token; stopped (SIGTERM) afterwards.

    The token always begins with '-' (token_urlsafe gives one in 64 such tokens): clients and
    command lines must cope with it every run, not only on an unlucky one."""
    import secrets

    server = HttpServer(home, "-" + secrets.token_urlsafe(24)).wait_ready()
    try:
        yield server
    finally:
        server.stop()


async def ok(client, tool: str, args: dict) -> dict:
    """Call a tool that must succeed; its structured reply."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool} failed: {result.content[0].text}"
    return result.structured_content


async def err(client, tool: str, args: dict) -> str:
    """Call a tool that must fail with a readable message (no traceback); the message."""
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool}({args}) should have failed"
    text = result.content[0].text
    assert "Traceback" not in text
    return text


def assert_noisy_worker_outvoted(live: dict, noisy_id: str) -> None:
    """One noisy worker of four (a session's live view): the run still reached 0.90 on digits and the
    noisy worker's reputation is below every honest worker's."""
    assert live["metrics"]["val_accuracy"] >= 0.90, live["metrics"]
    reputation = live["reputation"]
    honest = [v for k, v in reputation.items() if k != noisy_id]
    assert len(honest) == 3 and reputation[noisy_id] < min(honest), reputation


def held_out_digits(n: int = 200) -> tuple[list[list[float]], list[int]]:
    """``n`` digits examples from the validation split training leaves out (seed 0)."""
    from workers.data import load_dataset, train_val_split

    ds = load_dataset("digits")
    _, val = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
    val = val[:n]
    return ds.X[val].tolist(), ds.y[val].tolist()
