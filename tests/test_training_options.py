"""Training options are declared once (workers.protocol.TrainOptions): the tool and the templates
refuse the same out-of-bounds values, and a template refuses them before any node starts."""

from __future__ import annotations

import pytest
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from conftest import err, ok

pytestmark = pytest.mark.anyio


async def test_template_and_tool_refuse_the_same_bounds(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        tool = await err(client, "neural_train_distributed",
                         {"cluster_id": "dnc_none", "dataset": "digits", "grad_clip": 1e7})
        assert "grad_clip" in tool and "less than or equal to 1000000" in tool

        template = await err(client, "neural_deploy_template", {
            "template_id": "sync-digits", "custom_config": {"train": True, "training": {"grad_clip": 1e7}}})
        assert template.endswith("training arguments are invalid: grad_clip: Input should be less than or equal "
                                 "to 1000000"), template
        assert (await ok(client, "neural_cluster_list", {}))["clusters"] == []  # refused before any cluster

        resume = await err(client, "neural_deploy_template", {
            "template_id": "sync-digits", "custom_config": {"train": True, "training": {"resume_from": "x" * 5000}}})
        assert "resume_from: String should have at most 4096 characters" in resume
