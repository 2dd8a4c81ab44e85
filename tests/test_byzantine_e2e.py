"""Through the tools: a byzantine-robust template holds against a noisy worker, and status shows who it was."""

from __future__ import annotations

import pytest
from conftest import assert_noisy_worker_outvoted, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def test_krum_template_with_a_noisy_worker(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        built = await ok(client, "neural_deploy_template", {"template_id": "byzantine-robust-digits",
                                                             "custom_config": {"workers": 3}})
        cid = built["cluster_id"]
        noisy = (await ok(client, "neural_node_deploy", {
            "cluster_id": cid, "behavior": "gaussian_noise", "behavior_scale": 50}))
        assert noisy["group"]["action"] == "reformed"  # joined the running group as a new generation
        noisy_id = noisy["node_id"]
        recipe = {k: v for k, v in built["suggested_training"].items()}
        run = await ok(client, "neural_train_distributed", {**recipe, "wait": True, "batch_size": 8})
        assert run["status"] == "completed", run
        live = run["result"]
        assert_noisy_worker_outvoted(live, noisy_id)
        assert live["consensus"]["rejected_updates"] >= 1
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        row = next(n for n in status["nodes"] if n["node_id"] == noisy_id)
        assert row["metrics"]["reputation"] == live["reputation"][noisy_id]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
