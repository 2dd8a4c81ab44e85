"""A node that stops answering (SIGSTOP) is detected by its silence (NODE_SILENT_S), marked failed and stopped."""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest
from conftest import pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.telemetry import NODE_SILENT_S

pytestmark = pytest.mark.anyio


async def test_hung_node_is_detected(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await client.call_tool("neural_cluster_init", {"name": "hang"})).structured_content["cluster_id"]
        deployed = await client.call_tool("neural_node_deploy", {"cluster_id": cid, "count": 2})
        nodes = deployed.structured_content["nodes"]
        hung = nodes[0]
        os.kill(hung["pid"], signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            while time.monotonic() - frozen_at < 20:
                status = (await client.call_tool("neural_cluster_status", {"cluster_id": cid})).structured_content
                row = next(n for n in status["nodes"] if n["node_id"] == hung["node_id"])
                if row["status"] == "failed":
                    break
                await anyio.sleep(0.25)
            detected = time.monotonic() - frozen_at
            assert row["status"] == "failed" and "no answer" in row["error"], row
            # Its last push came at most a second before the freeze; the monitor looks every second.
            assert detected <= NODE_SILENT_S + 2, f"detected after {detected:.1f} s"
            for _ in range(40):  # the hung process is stopped, not left behind
                if not pid_alive(hung["pid"]):
                    break
                await anyio.sleep(0.25)
            assert not pid_alive(hung["pid"])
            other = next(n for n in status["nodes"] if n["node_id"] == nodes[1]["node_id"])
            assert other["alive"] and other["status"] == "running"
        finally:
            if pid_alive(hung["pid"]):
                os.kill(hung["pid"], signal.SIGKILL)
        await client.call_tool("neural_cluster_terminate", {"cluster_id": cid})
