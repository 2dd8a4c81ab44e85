"""After training: distributed prediction, benchmark, export/load, plot and the event stream."""

from __future__ import annotations

import base64
import json
import struct
import time

import numpy as np
import pytest
from conftest import err, held_out_digits, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


async def test_predict_export_load_plot_and_events(home):
    X, y = held_out_digits()
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "serve", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert "holds a model" in await err(client, "neural_predict_distributed",
                                            {"cluster_id": cid, "input_data": json.dumps(X[0])})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 6, "learning_rate": 0.003, "wait": True,
            "quantization": {"enabled": True, "bits": 8, "method": "dynamic"}})
        sid = run["session_id"]
        assert run["status"] == "completed"

        batch = json.dumps({"inputs": X, "labels": y})
        by_method = {}
        for method in ("mean", "majority", "weighted", "ensemble"):
            pred = by_method[method] = await ok(client, "neural_predict_distributed", {
                "cluster_id": cid, "input_data": batch, "aggregation": method, "quantized": False})
            assert pred["aggregation_method"] == method and pred["nodes_used"] == 2
            assert pred["metrics"]["accuracy"] >= 0.85, (method, pred["metrics"]["accuracy"])
            assert len(pred["metrics"]["confusion_matrix"]) == 10
            assert all(p["latency_ms"] > 0 and p["round_trip_ms"] > 0 for p in pred["individual_predictions"])
            assert set(pred["prediction"]) <= {str(d) for d in range(10)}
        assert "nodes" in pred["details"][0]  # ensemble reports each node's vote
        single = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X[0])})
        assert single["prediction"] == by_method["mean"]["prediction"][0] and single["aggregation_method"] == "mean"
        shard = await ok(client, "neural_predict_distributed",
                         {"cluster_id": cid, "input_data": batch, "mode": "shard", "quantized": False})
        assert sum(p["examples"] for p in shard["individual_predictions"]) == len(X)
        assert shard["metrics"]["accuracy"] >= 0.85
        int8 = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": batch})
        assert int8["model"] == "int8" and abs(int8["metrics"]["accuracy"] - pred["metrics"]["accuracy"]) < 0.05
        bad = await err(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": "[1, 2, 3]"})
        assert "64" in bad

        # Benchmark: ordered percentiles that agree with what this client measures.
        one = json.dumps([X[0]])
        bench = await ok(client, "neural_performance_benchmark", {"model_id": cid, "benchmark_type": "comprehensive",
                                                                   "input_data": one, "runs": 30, "quantized": True})
        res = bench["results"]
        assert 0 < res["latency_p50"] <= res["latency_p95"] <= res["latency_p99"]
        assert res["model_size_mb"] > 0 and res["peak_memory_mb"] > 50 and res["int8"]["size_mb"] < res["model_size_mb"]
        assert {c["topology"] for c in bench["collectives"]} == {"mesh", "ring", "star", "hierarchical"}
        client_ms = []
        for _ in range(15):
            t0 = time.perf_counter()
            await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": one, "quantized": False})
            client_ms.append((time.perf_counter() - t0) * 1000)
        ratio = float(np.median(client_ms)) / res["latency_p50"]
        assert 0.5 <= ratio <= 2.0, (client_ms, res)

        # Export, then a fresh cluster loads it and predicts the same.
        before = await ok(client, "neural_predict_distributed",
                          {"cluster_id": cid, "input_data": batch, "quantized": False})
        export = await ok(client, "neural_model_export", {"model_id": cid})
        names = {f.rsplit("/", 1)[-1] for f in export["files"]}
        assert {"model.safetensors", "config.json", "labels.json", "README.md"} <= names
        card = open(next(f for f in export["files"] if f.endswith("README.md"))).read()
        assert "val_accuracy" in card
        ts = await ok(client, "neural_model_export", {"model_id": cid, "format": "torchscript"})
        assert any(f.endswith("model.torchscript.pt") for f in ts["files"])
        fresh = (await ok(client, "neural_cluster_init", {"name": "fresh", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": fresh})
        await ok(client, "neural_model_load", {"cluster_id": fresh, "path": export["directory"]})
        after = await ok(client, "neural_predict_distributed", {"cluster_id": fresh, "input_data": batch})
        assert after["prediction"] == before["prediction"]
        await ok(client, "neural_model_load", {"cluster_id": fresh, "path": ts["directory"]})
        traced = await ok(client, "neural_predict_distributed", {"cluster_id": fresh, "input_data": batch})
        assert traced["prediction"] == before["prediction"]
        outside = await err(client, "neural_model_export", {"model_id": cid, "destination": "/tmp/elsewhere"})
        assert "allowed roots" in outside

        # The plot: a real PNG, wider when more epochs are plotted.
        plot = await client.call_tool("neural_training_plot", {"session_id": sid})
        assert not plot.is_error
        image = next(c for c in plot.content if c.type == "image")
        w6, _ = png_size(base64.b64decode(image.data))
        assert plot.structured_content["epochs_plotted"] == 6
        short = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 2,
                                                              "wait": True})
        plot2 = await client.call_tool("neural_training_plot", {"session_id": short["session_id"]})
        w2, _ = png_size(base64.b64decode(next(c for c in plot2.content if c.type == "image").data))
        assert w6 > w2

        # Events: cursor semantics and the resource.
        events = await ok(client, "execution_stream_subscribe", {"deployment_id": sid, "wait_s": 0})
        kinds = [e["kind"] for e in events["events"]]
        assert kinds[0] == "session_started" and kinds.count("epoch_completed") == 6 and "session_completed" in kinds
        later = await ok(client, "execution_stream_subscribe", {"deployment_id": sid, "cursor": events["cursor"],
                                                                 "wait_s": 0.5})
        assert later["events"] == [] and later["status"] == "completed"
        resource = await client.read_resource(f"session://{sid}/events")
        assert [e["kind"] for e in json.loads(resource.contents[0].text)] == kinds

        # A checkpoint alone can be benchmarked.
        status = await ok(client, "neural_training_status", {"session_id": sid})
        ckpt = next(c for c in status["checkpoints"] if not c["deleted"])["checkpoint_id"]
        cb = await ok(client, "neural_performance_benchmark", {"model_id": ckpt, "benchmark_type": "inference",
                                                                "runs": 10})
        assert cb["results"]["accuracy"] >= 0.85
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        await ok(client, "neural_cluster_terminate", {"cluster_id": fresh})
