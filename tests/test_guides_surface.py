"""The guides' tool surface without training: every argument accepted or reported (ignored /
unknown), templates by the guides' ids, layer lists, compression that pays, schedules, checkpoints."""

from __future__ import annotations

import math

import anyio
import pytest
import torch
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service import templates
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.guide_view import convergence_rate
from flow_nexus_server.service.paths import sandbox_path
from workers import protocol as p
from workers.comm import sparse_pays, topk_payload_bytes
from workers.models import TaskInfo, build_model
from workers.training.schedule import Plateau, lr_factor

pytestmark = pytest.mark.anyio

GUIDE_LAYERS = [{"type": "embedding", "vocab_size": 50000, "embedding_dim": 768},
                {"type": "transformer_block", "num_heads": 12, "hidden_dim": 3072, "num_layers": 12},
                {"type": "output", "num_classes": 50000}]


async def test_unknown_and_compatibility_arguments_are_reported_not_dropped(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        result = await client.call_tool("neural_cluster_init", {
            "name": "c", "daaEnabled": True, "auto_healing": True, "replication_factor": 3, "colour": "blue"})
        assert not result.is_error, result.content[0].text
        reply = result.structured_content
        assert reply["unknown"] == ["colour"]
        assert set(reply["ignored"]) == {"daaEnabled", "replication_factor"}  # auto_healing acts
        note = result.content[-1].text
        assert "colour" in note and "replication_factor" in note and "unknown" in note
        cid = reply["cluster_id"]
        assert reply["max_nodes"] == 100

        quiet = await ok(client, "neural_cluster_list", {})
        assert quiet["ignored"] == {} and quiet["unknown"] == []

        # the guide's 162M-parameter layer list does not fit a node: refused with the numbers
        guide_node = {"cluster_id": cid, "node_type": "parameter_server", "role": "parameter_server",
                      "model": "large", "template": "nodejs", "autonomy": 0.9,
                      "capabilities": ["gradient_storage", "weight_updates", "synchronization"]}
        refused = await err(client, "neural_node_deploy", {**guide_node, "layers": GUIDE_LAYERS})
        assert "161,904,464 parameters (162M)" in refused and "5,559 MB" in refused and "400 MB" in refused
        # a layer list on a 'large' node builds the model from it, said in the reply
        small = [{**GUIDE_LAYERS[0], "embedding_dim": 32}, {**GUIDE_LAYERS[1], "num_heads": 4, "hidden_dim": 64,
                                                            "num_layers": 1}, GUIDE_LAYERS[2]]
        node = await ok(client, "neural_node_deploy", {**guide_node, "layers": small})
        assert node["nodes"][0]["model"] == "custom" and "model" in node["ignored"]
        assert node["capabilities"] == ["gradient_storage", "weight_updates", "synchronization"]
        assert "layers[0].vocab_size" in node["ignored"]
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["nodes"][0]["capabilities"] == ["gradient_storage", "weight_updates", "synchronization"]

        events = await client.call_tool("execution_stream_subscribe", {"deployment_id": "train_nothing",
                                                                      "stream_type": "claude-flow-swarm"})
        assert events.is_error and "train_nothing" in events.content[0].text  # known argument, unknown session

        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "wikitext-103"})
        assert "bbc-news-lm" in text and "text files" in text
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_guide_template_with_custom_config_and_user_id(home, monkeypatch):
    monkeypatch.setattr(templates, "available_memory_mb", lambda: 100.0)
    async with Client(build_server(Settings.from_env(home))) as client:
        args = {"template_id": "tmpl_transformer_large", "user_id": "usr_abc123",
                "custom_config": {"num_workers": 2, "num_parameter_servers": 1, "model_size": "125M"}}
        refused = await err(client, "neural_deploy_template", args)
        # the nearest preset (xl) on 4 nodes needs 4 x 9 float32 copies of 88.2 M parameters = about 12,116 MB
        assert "'xl'" in refused and "88,226,304" in refused and "12,116 MB" in refused and "100 MB" in refused
    monkeypatch.setattr(templates, "available_memory_mb", lambda: 50_000.0)
    async with Client(build_server(Settings.from_env(home))) as client:
        reply = await ok(client, "neural_deploy_template", {**args, "custom_config": {
            "num_workers": 1, "num_parameter_servers": 1, "model_size": "4M"}})
        assert reply["ignored"] == {"user_id": reply["ignored"]["user_id"]} and "account" in reply["ignored"]["user_id"]
        assert reply["template_id"] == "transformer-large" and reply["model_size"]["preset"] == "large"
        roles = sorted(n["role"] for n in reply["nodes"])
        assert roles == ["aggregator", "parameter_server", "worker"]
        assert {n["model"] for n in reply["nodes"]} == {"large"}
        await ok(client, "neural_cluster_terminate", {"cluster_id": reply["cluster_id"]})


def test_preset_parameter_table_matches_the_built_models():
    torch.set_num_threads(1)
    task = TaskInfo(kind="lm", input_shape=(), num_classes=4000, vocab_size=4000, max_len=128)
    for preset, count in templates.PRESET_PARAMETERS.items():
        assert sum(q.numel() for q in build_model("transformer", preset, task).parameters()) == count
    assert templates.parse_model_size("125M") == 125_000_000 and templates.parse_model_size("1.3B") == 1_300_000_000
    with pytest.raises(ServiceError, match="125 millions"):
        templates.parse_model_size("125 millions")


async def test_arguments_that_disagree_get_a_sentence_through_the_tool(home):
    """Cross-field rules are checked on the whole option set: found by the fuzzer, they once left
    the tool with the SDK's bare 'Error executing tool' (a pydantic error escaping the tool)."""
    async with Client(build_server(Settings.from_env(home))) as client:
        text = await err(client, "neural_train_distributed", {
            "cluster_id": "dnc_000000000000", "dataset": "digits", "gradient_compression": 0.5,
            "compression_ratio": 1})
    assert "gradient_compression 0.5 and compression_ratio 1.0 disagree" in text, text
    assert "internal error" not in text and "Value error" not in text


def test_compression_true_is_top_k_half_and_sparse_only_when_smaller():
    opts = p.TrainOptions(dataset="digits", gradient_compression=True)
    assert opts.gradient_compression == 0.5
    tenth = p.TrainOptions(dataset="digits", gradient_compression=True, compression_ratio=0.1)
    assert tenth.gradient_compression == 0.1
    assert p.TrainOptions(dataset="digits", gradient_compression=False).gradient_compression is None
    with pytest.raises(ValueError, match="disagree"):
        p.TrainOptions(dataset="digits", gradient_compression=0.2, compression_ratio=0.3)
    numel = 10_000
    assert topk_payload_bytes(numel, 4, 0.5) == 5_000 * 8  # values + int32 indices
    assert not sparse_pays("mesh", 2, numel, 4, 0.5)  # as many bytes as dense: dense is sent
    assert not sparse_pays("mesh", 4, numel, 4, 0.5)
    assert sparse_pays("mesh", 4, numel, 4, 0.1) and sparse_pays("star", 4, numel, 4, 0.1)
    assert not sparse_pays("mesh", 1, numel, 4, 0.01)


def test_learning_rate_schedules():
    total = 100
    assert [lr_factor(s, total, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, total, "cosine") == 1.0 and math.isclose(lr_factor(total, total, "cosine"), 0.1)
    assert lr_factor(0, total, "warmup_cosine", warmup_steps=10) == 0.1
    assert lr_factor(9, total, "warmup_cosine", warmup_steps=10) == 1.0
    assert [lr_factor(s, total, "step") for s in (10, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])
    plateau = Plateau()
    for loss in (1.0, 0.9, 0.95, 0.92):
        plateau.observe(loss)
    assert plateau.factor == 0.5


def test_guide_paths_name_sandbox_files(tmp_path):
    roots = [tmp_path]
    assert sandbox_path("/data/train_*.json", roots) == "data/train_*.json"
    assert sandbox_path(f"{tmp_path}/data/x.csv", roots) is None  # a host path under an allowed root wins
    assert sandbox_path("data/x.csv", roots) is None and sandbox_path("digits", roots) is None
    assert sandbox_path("/data/../etc/passwd", roots) is None  # refused by the usual checks


def test_convergence_rate_is_the_measured_fall_per_epoch():
    assert convergence_rate({1: {"val_loss": 1.0}}) is None
    assert convergence_rate({1: {"val_loss": 1.0}, 3: {"val_loss": 0.8}}) == pytest.approx(0.1)
    assert convergence_rate({1: {"loss": 2.0}, 2: {"loss": 1.0}}) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.long
async def test_checkpoints_on_improvement_best_kept_schedule_and_compression_that_does_not_pay(home, tmp_path):
    """Digits on two workers: compression true (ratio 0.5) goes dense with the figures to show it,
    the step schedule drops the learning rate, checkpoints follow improvements and the best stays."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "c", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        outside = tmp_path / "outside" / "d.csv"
        outside.parent.mkdir()
        outside.write_text("f1,label\n1,SECRET_A\n2,SECRET_B\n")
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": str(outside)})
        assert "outside the allowed roots" in text and str(home) in text and "sandbox" in text, text
        assert "SECRET" not in text  # the host file was not read: the path named a (missing) sandbox file
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 4, "batch_size": 32, "learning_rate": 0.01,
            "gradient_compression": True, "lr_schedule": "step", "checkpoint_on_improvement": 0.01,
            "checkpoint_best": True, "max_checkpoints": 1, "wait": True, "wait_timeout_s": 300})
        assert run["status"] == "completed", run["result"]
        assert run["config"]["extra"]["gradient_compression"] == 0.5
        for _ in range(40):  # the nodes' last stats and checkpoint records arrive by telemetry push, possibly
            # just after the end
            status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
            nodes = list(status["live"]["nodes"].values())
            if any(n.get("best_checkpoint_epoch") for n in nodes) and len(status["checkpoints"]) >= 2:
                break
            await anyio.sleep(0.25)
        lrs = [value for _, _, value in status["history"]["lr"]]
        assert lrs[0] > lrs[-1] and math.isclose(lrs[-1] / 0.01, 0.01, rel_tol=0.2)  # x0.1 twice
        assert all(n["dense_fallback_buckets"] > 0 and n["bytes_saved"] == 0 for n in nodes)
        assert all(n["sent_bytes"] == n["dense_bytes"] > 0 for n in nodes)
        written = status["checkpoints"]
        kept = [c for c in written if not c["deleted"]]
        assert len(written) >= 2  # val_loss improved by more than 1% after epoch 1
        best = next(n["best_checkpoint_epoch"] for n in nodes if n.get("best_checkpoint_epoch"))
        val_loss = {int(epoch): value for epoch, _, value in status["history"]["val_loss"]}
        assert val_loss[best] == min(val_loss.values())  # the best by val_loss ...
        assert any(c["epoch"] == best for c in kept)  # ... survives max_checkpoints=1
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
