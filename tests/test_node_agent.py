"""The node agent on its own: token-guarded control API, start-up failures carry their reason."""

from __future__ import annotations

import secrets
import sys

import httpx
import psutil
import pytest
from conftest import pid_alive

from flow_nexus_server.launchers import LaunchError, NodeSpec, SubprocessLauncher


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    token = secrets.token_hex(32)
    sandbox = tmp_path_factory.mktemp("sandbox")
    launcher = SubprocessLauncher()
    handle = launcher.launch(NodeSpec("node_test0001", "dnc_test", "worker", sandbox, token), timeout_s=60)
    yield launcher, handle, token
    launcher.terminate(handle, grace_s=2)


def test_requests_without_the_token_are_rejected(node):
    _, handle, token = node
    url = f"http://{handle.host}:{handle.port}/health"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    body = ok.json()
    assert body["node_id"] == "node_test0001" and body["pid"] == handle.pid and body["rss_bytes"] > 0


def test_token_is_not_on_the_command_line(node):
    _, handle, token = node
    assert not any(token in arg for arg in psutil.Process(handle.pid).cmdline())


def test_terminate_leaves_no_process(tmp_path):
    launcher = SubprocessLauncher()
    handle = launcher.launch(NodeSpec("node_test0002", "dnc_test", "worker", tmp_path, "t" * 64), timeout_s=60)
    assert pid_alive(handle.pid)
    assert launcher.terminate(handle, grace_s=5)
    assert not pid_alive(handle.pid)


def test_a_node_that_dies_at_start_reports_its_log(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ImportError: no module named torch' >&2\nexit 3\n")
    broken.chmod(0o755)
    launcher = SubprocessLauncher(python=str(broken))
    with pytest.raises(LaunchError) as err:
        launcher.launch(NodeSpec("node_test0003", "dnc_test", "worker", tmp_path / "s", "t"), timeout_s=30)
    assert "code 3" in str(err.value) and "no module named torch" in str(err.value)


def test_agent_refuses_to_start_without_a_token(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "workers.agent", "--node-id", "n", "--cluster-id", "c", "--sandbox", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "FLOW_NEXUS_NODE_TOKEN" in proc.stderr
