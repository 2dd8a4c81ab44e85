"""The published tool contract: training options declared once (workers.protocol.TrainOptions), so the
tool and the templates refuse the same values; honest annotations, described parameters, and
unbuilt architectures answered with a sentence."""

from __future__ import annotations

import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

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


async def test_declarations_are_honest_and_described(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    for name in ("neural_model_load", "neural_train_distributed", "neural_node_upload"):
        assert tools[name].annotations.destructive_hint is True, name  # they replace what nodes serve or hold
    for t in tools.values():
        assert "\n " not in t.description, t.name  # no docstring indentation
        undescribed = [k for k, v in t.input_schema["properties"].items() if not v.get("description")]
        assert undescribed == [], (t.name, undescribed)
    assert tools["neural_training_status"].input_schema["anyOf"] == [{"required": ["session_id"]},
                                                                     {"required": ["job_id"]}]
    arch = tools["neural_cluster_init"].input_schema["properties"]["architecture"]
    assert arch["enum"] == ["transformer", "cnn", "rnn", "mlp"]


async def test_unbuilt_architectures_are_refused_with_a_sentence(home):
    supported = "use one of transformer, cnn, rnn, mlp"
    async with Client(build_server(Settings.from_env(home))) as client:
        for arch in ("gnn", "hybrid"):
            text = await err(client, "neural_cluster_init", {"name": "x", "architecture": arch})
            assert f"architecture '{arch}' is not implemented by this server's nodes; {supported}" in text
            assert "validation error" not in text
        text = await err(client, "neural_train_distributed", {"cluster_id": "dnc_none", "dataset": "digits",
                                                              "architecture": "gnn"})
        assert supported in text and "validation error" not in text
        text = await err(client, "neural_deploy_template", {"template_id": "sync-digits",
                                                            "custom_config": {"architecture": "hybrid"}})
        assert supported in text
        text = await err(client, "neural_deploy_template", {
            "template_id": "sync-digits", "custom_config": {"train": True, "training": {"architecture": "gnn"}}})
        assert supported in text
        assert (await ok(client, "neural_cluster_list", {}))["clusters"] == []
