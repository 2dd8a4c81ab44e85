"""The NCCL path on real GPUs: skipped where torch sees no CUDA device (CI is CPU-only).

Run on a GPU machine with a CUDA build of torch: ``python -m pytest tests/test_gpu.py``.
One GPU covers a one-worker cluster (NCCL wants a GPU per rank); two cover the two-worker
run whose ring topology stages gradient buckets through CPU over gloo.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import held_out_digits, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.anyio, pytest.mark.skipif(GPUS < 1, reason="torch sees no CUDA device here")]


def test_device_pinning_and_bf16_autocast():
    from workers.devices import autocast, pin_device

    assert pin_device("gloo", 3) == torch.device("cpu")
    device = pin_device("nccl", GPUS)  # local rank GPUS wraps round to cuda:0
    assert device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    x = torch.randn(4, 4, device=device)
    with autocast(True, device):
        y = x @ x
    assert y.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


@pytest.mark.parametrize("workers,topology", [(1, "mesh"), (2, "mesh"), (2, "ring")])
async def test_synchronous_training_on_gpus_over_nccl(home, workers, topology):
    if workers > GPUS:
        pytest.skip(f"{workers} workers need {workers} GPUs (NCCL takes one per rank); {GPUS} here")
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "gpu", "topology": topology}))["cluster_id"]
        nodes = [n["node_id"] for n in (await ok(client, "neural_node_deploy",
                                                 {"cluster_id": cid, "count": workers}))["nodes"]]
        conn = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert conn["backend"] == "nccl"
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 8, "batch_size": 32, "learning_rate": 0.01,
            "mixed_precision": True, "wait": True})
        assert run["status"] == "completed", run
        assert run["result"]["metrics"]["val_accuracy"] >= 0.9
        logs = await ok(client, "neural_node_logs", {"node_id": nodes[-1], "tail": 200})
        assert f"computing on cuda:{(workers - 1) % GPUS}" in logs["log"]
        # The trained model serves from CPU after a GPU run.
        X, y = held_out_digits()
        pred = await ok(client, "neural_predict_distributed", {
            "cluster_id": cid, "input_data": json.dumps({"inputs": X, "labels": y})})
        assert pred["metrics"]["accuracy"] >= 0.85
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
