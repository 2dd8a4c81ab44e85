"""Limits and path checks: refused with the numbers or the allowed root, and nothing changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def test_limits_and_paths(home, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOW_NEXUS_MAX_NODE_PROCESSES", "1")
    monkeypatch.setenv("FLOW_NEXUS_MAX_INLINE_BYTES", "100000")
    data_root = tmp_path / "data"  # settings are read once: the extra root is named before the server starts
    data_root.mkdir()
    monkeypatch.setenv("FLOW_NEXUS_DATA_ROOTS", str(data_root))
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "limits"}))["cluster_id"]
        absurd = await err(client, "neural_node_deploy", {"cluster_id": cid, "memory_mb": 16_000_000})
        assert "16000000 MB" in absurd and "available" in absurd
        assert (await ok(client, "neural_cluster_status", {"cluster_id": cid}))["nodes"] == []

        node = (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["node_id"]
        over = await err(client, "neural_node_deploy", {"cluster_id": cid})
        assert "limit is 1" in over and "FLOW_NEXUS_MAX_NODE_PROCESSES" in over

        outside = tmp_path / "outside"
        outside.mkdir()
        sandbox = home / "clusters" / cid / "nodes" / node
        (sandbox / "escape").symlink_to(outside)
        for name in ("../../x", "escape/x", "agent.json", "/escape/x"):
            text = await err(client, "neural_node_upload", {"node_id": node, "file_name": name, "content": "x"})
            assert "sandbox" in text or "reserved" in text, text
        for name in ("/etc/passwd", str(outside / "x")):  # an absolute name is that path inside the sandbox
            up = await ok(client, "neural_node_upload", {"node_id": node, "file_name": name, "content": "x"})
            assert Path(up["path"]) == (sandbox / name.lstrip("/")).resolve(), up
        assert list(outside.iterdir()) == [] and not (home / "x").exists()
        assert Path("/etc/passwd").read_text() != "x"

        # (an absolute path outside the roots names a sandbox file: test_guides_surface checks it on a connected
        # cluster)
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "../secret.csv"})
        assert "'..'" in text
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": str(data_root / "d.csv")})
        assert "outside the allowed roots" not in text  # allowed; fails later for another reason
        big = '{"X": [' + ",".join(["[1, 2]"] * 30_000) + '], "y": [0]}'
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": big})
        assert "limit is 100000" in text and "FLOW_NEXUS_MAX_INLINE_BYTES" in text
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert os.environ.get("FLOW_NEXUS_MAX_NODE_PROCESSES") == "1"
