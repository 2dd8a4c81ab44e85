"""Training through the MCP tools on real node processes (in-memory client, real nodes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import err, ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from workers.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.anyio


async def cluster(client: Client, roles: dict[str, int], topology: str = "mesh",
                  architecture: str = "mlp") -> tuple[str, list[str]]:
    cid = (await ok(client, "neural_cluster_init", {"name": "t", "topology": topology,
                                                     "architecture": architecture}))["cluster_id"]
    ids = []
    for role, count in roles.items():
        ids += [n["node_id"] for n in (await ok(client, "neural_node_deploy",
                                               {"cluster_id": cid, "role": role, "count": count}))["nodes"]]
    await ok(client, "neural_cluster_connect", {"cluster_id": cid})
    return cid, ids


def weights(path: str) -> torch.Tensor:
    state = read_checkpoint(Path(path))["model_state"]
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


async def test_synchronous_digits_and_topologies_agree(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, nodes = await cluster(client, {"worker": 2})
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        result = await client.call_tool("neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 10, "batch_size": 32, "learning_rate": 0.01,
            "wait": True, "checkpoint_every": 5, "max_checkpoints": 1}, progress_callback=on_progress)
        assert not result.is_error, result.content[0].text
        run = result.structured_content
        assert run["status"] == "completed" and run["config"]["mode"] == "sync"
        assert run["result"]["metrics"]["val_accuracy"] >= 0.95
        assert progress and progress == sorted(progress) and progress[-1] >= 99

        status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        assert len(status["history"]["val_accuracy"]) == 10
        kept = [c for c in status["checkpoints"] if not c["deleted"]]
        assert len(kept) == 1 and Path(kept[0]["path"]).exists()  # max_checkpoints=1
        for node in status["live"]["nodes"].values():
            assert node["samples_processed"] > 0 and node["bytes_sent"] > 0

        # The same seed gives the same weights whichever topology combines the gradients.
        finals = {}
        for topology in ("mesh", "ring"):
            await ok(client, "neural_cluster_connect", {"cluster_id": cid, "topology": topology})
            run = await ok(client, "neural_train_distributed", {
                "cluster_id": cid, "dataset": "digits", "epochs": 1, "seed": 7, "wait": True})
            assert run["status"] == "completed"
            finals[topology] = weights(run["result"]["checkpoints"][-1])
        assert (finals["mesh"] - finals["ring"]).abs().max().item() <= 1e-4

        term = await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert term["final_metrics"]["val_accuracy"] > 0.5 and term["checkpoints"]


async def test_bad_training_calls_start_nothing(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "bad", "architecture": "cnn"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits"})
        assert "not connected" in text and "neural_cluster_connect" in text
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        text = await err(client, "neural_train_distributed",
                         {"cluster_id": cid, "dataset": "digits", "federated": True})
        assert "worker" in text
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker"})
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "no-such-data"})
        assert "no-such-data" in text
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "bbc-news-lm"})
        assert "cnn" in text
        assert "greater than or equal to 1" in await err(
            client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 0})
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["features"]["training_sessions"] == 0 and status["status"] == "connected"
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_parameter_server_digits(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, _ = await cluster(client, {"parameter_server": 2, "worker": 2})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 10, "learning_rate": 0.01, "wait": True})
        assert run["config"]["mode"] == "parameter_server" and run["status"] == "completed"
        assert run["result"]["metrics"]["val_accuracy"] >= 0.93
        ps = [s for nid, s in run["result"]["nodes"].items() if run["roles"][nid] == "parameter_server"]
        assert len(ps) == 2 and all(s["updates_applied"] > 0 for s in ps)
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_language_model_on_uploaded_text_beats_unigram(home):
    """Each of 2 workers gets its own .txt (neural_node_upload); the GPT-2 model with its BPE
    tokenizer trains across both and beats a unigram model of the same tokenizer."""
    from workers.data import load_dataset

    texts = load_dataset("bbc-news-lm").X
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, nodes = await cluster(client, {"worker": 2}, architecture="transformer")
        for i, node in enumerate(nodes):
            await ok(client, "neural_node_upload", {"node_id": node, "file_name": "corpus/news.txt",
                                                     "content": "\n".join(texts[i * 60:(i + 1) * 60])})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "corpus/*.txt", "epochs": 2, "batch_size": 8, "learning_rate": 0.003,
            "wait": True, "wait_timeout_s": 400})
        assert run["status"] == "completed", run
        metrics = run["result"]["metrics"]
        assert metrics["val_perplexity"] < 0.9 * metrics["baseline_perplexity"], metrics
        assert metrics["tokens_per_s"] > 0
        status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        assert status["final_metrics"]["baseline_perplexity"] == metrics["baseline_perplexity"], status
        assert status["final_metrics"]["tokens_per_s"] > 0 and len(status["history"]["val_perplexity"]) == 2
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_stop_and_upload_private_data(home, tmp_path):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid, nodes = await cluster(client, {"worker": 2})
        # Each worker gets its own private file; only that node can read it.
        rows = "\n".join(f"{i % 7},{(i * 3) % 11},{i % 2}" for i in range(200))
        for node in nodes:
            up = await ok(client, "neural_node_upload", {"node_id": node, "file_name": "data/mine.csv",
                                                          "content": "a,b,label\n" + rows})
            assert up["relative_path"] == "data/mine.csv" and Path(up["path"]).exists()
        escape = await err(client, "neural_node_upload", {"node_id": nodes[0], "file_name": "../../x", "content": "x"})
        assert "'..'" in escape and not (Path(home) / "x").exists()
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "data/mine.csv",
                                                             "epochs": 1000, "batch_size": 8})
        for _ in range(120):
            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            if status["training"] and status["training"]["step"] > 0:
                break
        stopped = await ok(client, "neural_training_stop", {"session_id": run["session_id"]})
        assert stopped["status"] == "stopped"
        logs = await ok(client, "neural_node_logs", {"node_id": nodes[0], "tail": 200})
        assert re.search(r"private", logs["log"])
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["status"] == "connected" and all(n["alive"] for n in status["nodes"])
        pids = [n["pid"] for n in status["nodes"]]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert not any(pid_alive(p) for p in pids)
