"""The headline scenario over a real stdio MCP client: federated sentiment on 4 workers + aggregator."""

from __future__ import annotations

import json
import re
import time

import anyio
import pytest
from conftest import ok, pid_alive, server_command, server_env
from mcp import Client, StdioServerParameters

from workers.data import load_dataset, train_val_split


def held_out_tweets(n: int) -> tuple[list[str], list[str]]:
    """Tweets from the validation split the session held out (same seed, same split)."""
    ds = load_dataset("tweet-polarity")
    _, val = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
    val = val[:n]
    return [ds.X[i] for i in val], [ds.label_names[int(ds.y[i])] for i in val]

pytestmark = pytest.mark.anyio


@pytest.mark.slow
@pytest.mark.long
async def test_federated_tweet_polarity(home):
    params = StdioServerParameters(command=server_command(), env=server_env(home))
    async with Client(params, read_timeout_seconds=300) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "sentiment", "topology": "star",
                                                         "architecture": "transformer"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
        workers = [n["node_id"] for n in (await ok(client, "neural_node_deploy",
                                                   {"cluster_id": cid, "role": "worker", "count": 4}))["nodes"]]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        start = time.monotonic()
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "tweet-polarity", "federated": True, "rounds": 3, "local_epochs": 2,
            "batch_size": 32, "learning_rate": 0.001})
        assert run["config"]["mode"] == "federated" and run["nodes_training"] == 4
        seen_progress, worker_stats = [], {}
        while time.monotonic() - start < 300:
            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            live = status["training"]
            seen_progress.append(live["progress_pct"])
            worker_stats.update({n["node_id"]: n["metrics"] for n in status["nodes"]
                                 if n["node_id"] in workers and n["metrics"].get("samples_processed")})
            if live["status"] != "running":
                break
            await anyio.sleep(2)
        elapsed = time.monotonic() - start
        assert live["status"] == "completed", live
        assert elapsed < 300
        assert seen_progress == sorted(seen_progress) and seen_progress[-1] == 100
        assert len(set(seen_progress)) >= 3, "status never showed the run in progress"
        assert set(worker_stats) == set(workers)
        final = (await ok(client, "neural_training_status", {"session_id": run["session_id"]}))["final_metrics"]
        assert final["val_accuracy"] >= 0.88, final
        assert final["epochs_done"] == 3
        shards = set()
        for node in workers:
            log = (await ok(client, "neural_node_logs", {"node_id": node, "tail": 400}))["log"]
            found = re.findall(r"read shard (\d+)/4", log)
            assert len(set(found)) == 1, f"{node} read {found}"
            shards.add(found[0])
        assert shards == {"1", "2", "3", "4"}
        # Predictions from the nodes' models on 200 held-out tweets, with each aggregation rule.
        texts, labels = held_out_tweets(200)
        batch = json.dumps({"inputs": texts, "labels": labels})
        for method in ("mean", "majority", "weighted", "ensemble"):
            pred = await ok(client, "neural_predict_distributed",
                            {"cluster_id": cid, "input_data": batch, "aggregation": method})
            assert pred["metrics"]["accuracy"] >= 0.88, (method, pred["metrics"])
            assert set(pred["prediction"]) <= {"negative", "positive"} and "positive" in pred["prediction"]
            assert len(pred["individual_predictions"]) == 5
            assert all(p["latency_ms"] > 0 for p in pred["individual_predictions"])
        local = await ok(client, "neural_predict_distributed",
                         {"cluster_id": cid, "input_data": batch, "aggregation": "ensemble", "model": "local"})
        assert local["metrics"]["accuracy"] >= 0.85
        pids = [n["pid"] for n in status["nodes"]]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert not any(pid_alive(p) for p in pids)
