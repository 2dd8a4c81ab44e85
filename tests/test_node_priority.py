"""Local nodes run below the controller's CPU priority, so status answers promptly while they
keep every core busy; the controller itself keeps its own priority."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from conftest import ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


def test_lower_cpu_priority_raises_the_nice_value_of_the_calling_process():
    code = ("import os; from workers.priority import lower_cpu_priority; before = os.nice(0); "
            "lower_cpu_priority(7); print(os.nice(0) - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "7"


async def test_deployed_nodes_yield_the_cpu_and_the_server_does_not(home, monkeypatch):
    monkeypatch.setenv("FLOW_NEXUS_NODE_NICE", "12")
    own_nice = os.nice(0)
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "nice", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 1})
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        nices = [psutil.Process(n["pid"]).nice() for n in status["nodes"]]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert all(n >= own_nice + 12 or n == 19 for n in nices), nices
    assert os.nice(0) == own_nice
