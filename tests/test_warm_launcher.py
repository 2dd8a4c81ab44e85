"""The warm launcher: nodes forked from a template that has imported torch, isolated as cold ones."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT, pid_alive

from flow_nexus_server.launchers import LaunchError, NodeHandle, NodeSpec, SubprocessLauncher
from flow_nexus_server.launchers.local import process_create_time, process_ref
from flow_nexus_server.launchers.warm import WarmSubprocessLauncher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm spawner forks: Linux only")


def health(handle: NodeHandle, token: str) -> dict:
    reply = httpx.get(f"http://{handle.host}:{handle.port}/health",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def parent_pid(pid: int) -> int:
    return psutil.Process(pid).ppid()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def spec(root: Path, i: int, token: str, threads: int = 1) -> NodeSpec:
    node_id = f"node_{secrets.token_hex(4)}"
    return NodeSpec(node_id, "dnc_warm", "worker", root / "nodes" / f"{i}-{node_id}", token, threads)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A launcher whose template is up, and four nodes launched through it concurrently."""
    root = tmp_path_factory.mktemp("warm")
    launcher = WarmSubprocessLauncher(root / "home")
    assert launcher.start(), (root / "home" / "spawner.log").read_text()
    token = secrets.token_hex(32)
    specs = [spec(root, i, token, threads=2 if i == 3 else 1) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        handles = list(pool.map(lambda s: launcher.launch(s, timeout_s=60), specs))
    yield launcher, specs, handles, token
    for h in handles:
        launcher.terminate(h, grace_s=2)
    launcher.close()


def test_four_warm_nodes_answer_health_as_themselves(warm):
    launcher, specs, handles, token = warm
    pids = set()
    for s, h in zip(specs, handles):
        body = health(h, token)
        assert body["node_id"] == s.node_id and body["pid"] == h.pid
        assert h.ref == process_ref(h.pid, process_create_time(h.pid))
        assert parent_pid(h.pid) == launcher.spawner_pid, "forked by the template, not started cold"
        assert launcher.is_alive(h) == (True, None)
        pids.add(h.pid)
    assert len(pids) == 4
    assert [health(h, token)["torch_threads"] for h in handles] == [1, 1, 1, 2]


def test_each_node_is_isolated(warm):
    launcher, specs, handles, token = warm
    for s, h in zip(specs, handles):
        assert os.getpgid(h.pid) == h.pid and os.getsid(h.pid) == h.pid  # own session and group
        assert Path(psutil.Process(h.pid).cwd()) == s.sandbox.resolve()
        # Descriptors as Linux names them (the warm spawner runs on Linux only).
        assert os.readlink(f"/proc/{h.pid}/fd/0") == os.devnull
        assert Path(os.readlink(f"/proc/{h.pid}/fd/1")) == Path(os.readlink(f"/proc/{h.pid}/fd/2")) \
            == (s.sandbox / "node.log").resolve()
        log_text = (s.sandbox / "node.log").read_text()
        assert f"node {s.node_id} (worker) of cluster dnc_warm listening" in log_text
        assert f"pid {h.pid}" in log_text
        for other in specs:  # nobody else's start-up line
            assert other is s or other.node_id not in log_text
        # No descriptor of the template: only stdio, the node's own sockets and files.
        for fd in os.listdir(f"/proc/{h.pid}/fd"):
            target = os.readlink(f"/proc/{h.pid}/fd/{fd}")
            assert "spawner" not in target and not target.startswith("pipe:"), target


def test_the_token_is_never_on_a_command_line(warm):
    launcher, _, handles, token = warm
    for pid in [h.pid for h in handles] + [launcher.spawner_pid]:
        assert not any(token in arg for arg in psutil.Process(pid).cmdline())


def test_the_spawner_socket_is_owner_only(warm):
    launcher = warm[0]
    path = launcher._socket_path
    assert path is not None and path.parent == launcher.state_dir.resolve()
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_terminate_leaves_no_process(warm, tmp_path):
    launcher, _, _, token = warm
    handle = launcher.launch(spec(tmp_path, 0, token), timeout_s=60)
    assert pid_alive(handle.pid) and group_members(handle.pid) == [handle.pid]
    assert launcher.terminate(handle, grace_s=5)
    assert not pid_alive(handle.pid) and group_members(handle.pid) == []
    assert launcher.is_alive(handle) == (False, 0)  # graceful stop, reaped by the template


def test_a_node_killed_with_sigkill_is_reported_dead(warm, tmp_path):
    launcher, _, _, token = warm
    handle = launcher.launch(spec(tmp_path, 0, token), timeout_s=60)
    os.killpg(handle.pid, signal.SIGKILL)
    assert wait_gone(handle.pid)
    alive, code = launcher.is_alive(handle)
    assert not alive and code == -signal.SIGKILL
    assert launcher.terminate(handle, grace_s=1)


def test_liveness_is_pid_reuse_safe(warm):
    launcher, specs, handles, _ = warm
    h = handles[0]
    created = process_create_time(h.pid)
    stale = NodeHandle(h.node_id, h.host, h.port, h.pid, process_ref(h.pid, created - 5))
    assert launcher.is_alive(stale)[0] is False
    assert SubprocessLauncher().is_alive(stale)[0] is False
    # A stale ref is never signalled: the live process keeps running.
    assert launcher.terminate(stale, grace_s=1)
    assert launcher.is_alive(h) == (True, None)
    # A restarted server (another launcher object, either kind) re-attaches by the ref.
    assert SubprocessLauncher().is_alive(h) == (True, None)
    assert WarmSubprocessLauncher(specs[0].sandbox.parent).is_alive(h) == (True, None)


def test_killing_the_template_leaves_nodes_running(tmp_path):
    launcher = WarmSubprocessLauncher(tmp_path / "home")
    token = secrets.token_hex(32)
    try:
        assert launcher.start()
        handles = [launcher.launch(spec(tmp_path, i, token), timeout_s=60) for i in range(2)]
        template = launcher.spawner_pid
        os.kill(template, signal.SIGKILL)
        assert wait_gone(template)
        time.sleep(0.3)
        for h in handles:
            assert launcher.is_alive(h)[0]
            assert health(h, token)["node_id"] == h.node_id
        # The next launch starts a new template.
        third = launcher.launch(spec(tmp_path, 2, token), timeout_s=60)
        assert launcher.spawner_pid not in (None, template)
        assert parent_pid(third.pid) == launcher.spawner_pid
        handles.append(third)
        for h in handles:
            assert launcher.terminate(h, grace_s=5)
            assert not pid_alive(h.pid) and group_members(h.pid) == []
    finally:
        launcher.close()


def test_close_stops_the_template_but_not_the_nodes(tmp_path):
    launcher = WarmSubprocessLauncher(tmp_path / "home")
    token = secrets.token_hex(32)
    handle = launcher.launch(spec(tmp_path, 0, token), timeout_s=60)  # starts the template lazily
    template = launcher.spawner_pid
    assert template is not None and parent_pid(handle.pid) == template
    launcher.close()
    assert launcher.spawner_pid is None and not pid_alive(template)
    assert not list((tmp_path / "home").glob("*.sock"))
    assert launcher.is_alive(handle)[0] and health(handle, token)["node_id"] == handle.node_id
    assert launcher.terminate(handle, grace_s=5) and not pid_alive(handle.pid)


def test_the_template_ends_with_the_server_process(tmp_path):
    """The server dies without clean-up: its template goes too, the node it forked stays."""
    script = (
        "import sys, secrets\n"
        "from pathlib import Path\n"
        "from flow_nexus_server.launchers import NodeSpec\n"
        "from flow_nexus_server.launchers.warm import WarmSubprocessLauncher\n"
        "root = Path(sys.argv[1])\n"
        "launcher = WarmSubprocessLauncher(root / 'home')\n"
        "h = launcher.launch(NodeSpec('node_orphan01', 'dnc_x', 'worker', root / 'n', 't' * 64), 60)\n"
        "print(launcher.spawner_pid, h.pid, h.port, flush=True)\n"
        "sys.stdin.read()\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        template, node, port = map(int, server.stdout.readline().split())
    finally:
        server.kill()
        server.wait(timeout=30)
    assert wait_gone(template), "the template outlived the server"
    handle = NodeHandle("node_orphan01", "127.0.0.1", port, node, process_ref(node, process_create_time(node)))
    launcher = WarmSubprocessLauncher(tmp_path / "home2")
    assert launcher.is_alive(handle)[0] and health(handle, "t" * 64)["node_id"] == "node_orphan01"
    assert launcher.terminate(handle, grace_s=5) and not pid_alive(node)


def test_a_template_that_cannot_start_falls_back_to_a_cold_start(tmp_path, caplog):
    launcher = WarmSubprocessLauncher(tmp_path / "home", start_timeout_s=0.01)
    token = secrets.token_hex(32)
    s = spec(tmp_path, 0, token)
    with caplog.at_level(logging.WARNING, logger="flow_nexus_server.launchers.warm"):
        handle = launcher.launch(s, timeout_s=60)
    try:
        assert launcher.spawner_pid is None
        assert handle.ref == str(handle.pid)  # a cold node's ref
        assert health(handle, token)["node_id"] == s.node_id
        assert any("cold" in r.getMessage() for r in caplog.records)
        assert launcher.is_alive(handle) == (True, None)
    finally:
        assert launcher.terminate(handle, grace_s=5)
        launcher.close()
    assert not pid_alive(handle.pid)


def test_cold_refs_still_work_in_both_launchers(tmp_path):
    """A node started cold before a restart is re-attached by a warm launcher, and vice versa."""
    token = secrets.token_hex(32)
    cold = SubprocessLauncher()
    handle = cold.launch(spec(tmp_path, 0, token), timeout_s=60)
    try:
        warm = WarmSubprocessLauncher(tmp_path / "home")
        assert warm.is_alive(handle) == (True, None)
        assert warm.terminate(handle, grace_s=5)
        assert not pid_alive(handle.pid)
    finally:
        cold.terminate(handle, grace_s=1)


def test_a_node_that_dies_at_start_reports_its_exit_code_and_log(warm, tmp_path):
    launcher, _, _, token = warm
    s = spec(tmp_path, 0, token)
    (s.sandbox / "agent.json.tmp").mkdir(parents=True)  # the agent cannot write its ready file
    with pytest.raises(LaunchError) as err:
        launcher.launch(s, timeout_s=30)
    assert "exited with code 1" in str(err.value) and "IsADirectoryError" in str(err.value)
