"""Portable process handling: identity, liveness and memory through psutil, refs old and new,
and the plain subprocess launcher where forking a warm template is not safe."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.launchers import NodeHandle, SubprocessLauncher
from flow_nexus_server.launchers.local import node_process_alive, pid_exists, process_create_time, process_ref
from flow_nexus_server.launchers.warm import WarmSubprocessLauncher, local_launcher
from flow_nexus_server.server import build_server
from flow_nexus_server.service.nodes import available_memory_mb
from workers.training.common import rss_mb

NODE_ID = "node_portable1"


@pytest.fixture
def sleeper():
    """A process whose command line names NODE_ID, as a node's does; killed and reaped after."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", NODE_ID])
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def linux_start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: what refs written before psutil held (Linux only)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


# --------------------------------------------------------------------------- identity and liveness

def test_a_ref_names_one_process(sleeper):
    created = process_create_time(sleeper.pid)
    assert created == pytest.approx(psutil.Process(sleeper.pid).create_time())
    ref = process_ref(sleeper.pid, created)
    assert ref == f"{sleeper.pid}@{created:.3f}"
    assert node_process_alive(NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, ref))
    # Same pid, another process (created earlier): not this node.
    stale = NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, process_ref(sleeper.pid, created - 60))
    assert not node_process_alive(stale)
    assert SubprocessLauncher().is_alive(stale) == (False, None)
    assert SubprocessLauncher().terminate(stale, grace_s=1)  # never signalled
    assert pid_alive(sleeper.pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="refs before psutil were written on Linux only")
def test_refs_stored_before_psutil_are_still_read(sleeper):
    ticks = linux_start_ticks(sleeper.pid)
    old = NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, f"{sleeper.pid}:{ticks}")
    assert node_process_alive(old)
    assert SubprocessLauncher().is_alive(old) == (True, None)
    assert WarmSubprocessLauncher(Path("/nonexistent")).is_alive(old) == (True, None)
    stale = NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, f"{sleeper.pid}:{ticks - 6000}")  # 60 s earlier
    assert not node_process_alive(stale)


def test_a_bare_pid_is_alive_while_it_runs_this_node(sleeper):
    assert node_process_alive(NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, str(sleeper.pid)))
    assert not node_process_alive(NodeHandle("node_other001", "127.0.0.1", 0, sleeper.pid, str(sleeper.pid)))


def test_a_zombie_is_not_alive(sleeper):
    created = process_create_time(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert psutil.pid_exists(sleeper.pid)  # not reaped yet
    assert not pid_exists(sleeper.pid) and not pid_alive(sleeper.pid)
    assert process_create_time(sleeper.pid) is None
    handle = NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, process_ref(sleeper.pid, created))
    assert not node_process_alive(handle)
    assert not node_process_alive(NodeHandle(NODE_ID, "127.0.0.1", 0, sleeper.pid, str(sleeper.pid)))


def test_memory_figures_come_from_psutil():
    assert rss_mb() == pytest.approx(psutil.Process().memory_info().rss / 2**20, rel=0.2)
    available = available_memory_mb()
    assert available is not None and 0 < available <= psutil.virtual_memory().total / 2**20


# --------------------------------------------------------------------------- which launcher

def chosen(tmp_path: Path, caplog) -> tuple[str, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flow_nexus_server.launchers.warm"):
        launcher = local_launcher(tmp_path, Settings.from_env(tmp_path).spawner)
    return type(launcher).__name__, [r.getMessage() for r in caplog.records]


def test_the_plain_launcher_where_forking_is_unsafe(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("FLOW_NEXUS_SPAWNER", raising=False)
    if sys.platform.startswith("linux") and hasattr(os, "fork"):
        assert chosen(tmp_path, caplog) == ("WarmSubprocessLauncher", [])

    monkeypatch.setenv("FLOW_NEXUS_SPAWNER", "plain")
    name, lines = chosen(tmp_path, caplog)
    assert name == "SubprocessLauncher" and len(lines) == 1 and "FLOW_NEXUS_SPAWNER=plain" in lines[0]
    monkeypatch.delenv("FLOW_NEXUS_SPAWNER")

    monkeypatch.setattr(sys, "platform", "darwin")
    name, lines = chosen(tmp_path, caplog)
    assert name == "SubprocessLauncher" and len(lines) == 1 and "unsafe on darwin" in lines[0]

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delattr(os, "fork", raising=False)
    name, lines = chosen(tmp_path, caplog)
    assert name == "SubprocessLauncher" and len(lines) == 1 and "win32 has no fork" in lines[0]


@pytest.mark.anyio
async def test_a_cluster_trains_with_plain_subprocesses(home, monkeypatch, caplog):
    monkeypatch.setenv("FLOW_NEXUS_SPAWNER", "plain")
    caplog.set_level(logging.INFO, logger="flow_nexus_server.launchers.warm")
    async with Client(build_server(Settings.from_env(home))) as client:
        assert [r.getMessage() for r in caplog.records if "plain subprocesses" in r.getMessage()] == [
            "local nodes start as plain subprocesses, one cold interpreter each (FLOW_NEXUS_SPAWNER=plain)"]
        cid = (await ok(client, "neural_cluster_init", {"name": "plain", "topology": "mesh",
                                                         "architecture": "mlp"}))["cluster_id"]
        deploy = await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        pids = [n["pid"] for n in deploy["nodes"]]
        for node, pid in zip(deploy["nodes"], pids):
            cmdline = psutil.Process(pid).cmdline()  # a cold interpreter, not a fork of a template
            assert cmdline[1:3] == ["-m", "workers.agent"] and node["node_id"] in cmdline
        assert not (home / "spawner.log").exists()

        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 1, "batch_size": 32, "wait": True})
        assert run["status"] == "completed" and run["result"]["metrics"]["val_accuracy"] > 0.5

        term = await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 2
    assert [pid for pid in pids if pid_alive(pid)] == []
