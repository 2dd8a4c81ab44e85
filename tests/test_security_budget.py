"""Issue 11, finding 6: model sizes are bounded, a model over a node's memory_mb is refused before
its session starts, and a node whose resident memory passes its limit while running is stopped."""

from __future__ import annotations

import resource
import time

import anyio
import numpy as np
import psutil
import pytest
from conftest import err, ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service import budget
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.store import Node
from workers import protocol as p
from workers.budget import estimate_training_memory
from workers.data import Dataset, load_dataset

BIG_MLP = [{"type": "dense", "units": 8000}, {"type": "dense", "units": 8000}, {"type": "output"}]


def job(layers=None, model="custom", architecture="mlp", **kw) -> p.TrainJob:
    return p.TrainJob(session_id="s", mode="sync", topology="mesh", dataset="digits", architecture=architecture,
                      model=model, layers=layers, roles=["worker"], **kw)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# ------------------------------------------------------------------ the estimate (no node)

def test_the_estimate_measures_a_huge_model_without_allocating_it():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    est = estimate_training_memory(job(BIG_MLP), load_dataset("digits"))
    assert est.parameters == 64 * 8000 + 8000 + 8000 * 8000 + 8000 + 8000 * 10 + 10  # 64,608,010
    # Adam: weights, gradients, 2 optimizer tensors, 2 communication copies, the checkpoint's 3.
    assert est.model_state_mb == pytest.approx(est.parameters * 4 * 9 / 2**20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: the 246 MB weights never exist
    sgd = estimate_training_memory(job(BIG_MLP, optimizer="sgd"), load_dataset("digits"))
    assert sgd.model_state_mb < est.model_state_mb


def test_the_estimate_runs_for_every_architecture_on_text():
    texts = Dataset("t", "text", ["a short text", "another one here"] * 20, np.arange(40) % 2, ["x", "y"])
    lm = Dataset("l", "lm", ["words follow words"] * 20, None, [])
    for architecture in ("mlp", "cnn", "rnn", "transformer"):
        est = estimate_training_memory(job(model="base", architecture=architecture), texts)
        assert est.parameters > 0 and est.activations_mb > 0
    for architecture in ("rnn", "transformer"):
        assert estimate_training_memory(job(model="base", architecture=architecture), lm).parameters > 0


# ------------------------------------------------------------- the server's decisions (no node)

def node(**options) -> Node:
    return Node(id="node_x", role="worker", options=options)


def test_the_rss_limit_and_the_decision():
    settings = Settings.from_env()
    assert budget.rss_limit_mb(node(memory_mb=400), settings) == 400 * 1.5 + 512
    assert budget.rss_limit_mb(node(), settings) == settings.limits.node_memory_mb * 1.5 + 512  # older records
    assert budget.rss_limit_mb(node(memory_mb=400, cuda_devices=1), settings) == 400 * 1.5 + 512 + 2048
    assert budget.over_memory(node(memory_mb=400), 1000 * 2**20, settings) is None
    assert budget.over_memory(node(memory_mb=400), 1200 * 2**20, settings) == (1200, 1112)


def test_the_training_memory_check():
    settings = Settings.from_env()
    check = p.DatasetCheck(ok=True, parameters=64_608_010, estimated_train_mb=2241.6,
                           memory_breakdown_mb={"model_state_mb": 2218.0, "activations_mb": 23.5, "runtime_mb": 180})
    with pytest.raises(ServiceError) as refused:
        budget.check_training_memory(node(memory_mb=400), check, job(BIG_MLP), settings)
    text = str(refused.value)
    for part in ("64,608,010 parameters", "about 2,242 MB per node", "400 MB (memory_mb)", "node_x",
                 "memory_mb >= 2300", "smaller layers"):
        assert part in text, text
    budget.check_training_memory(node(memory_mb=2300), check, job(BIG_MLP), settings)  # fits
    budget.check_training_memory(node(), p.DatasetCheck(ok=True), job(BIG_MLP), settings)  # no estimate: no check


# ------------------------------------------------------------------ through the tools, real nodes

@pytest.mark.anyio
async def test_layer_sizes_are_bounded(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "bounds"}))["cluster_id"]
        for layer, bound in [({"type": "dense", "units": 100_000}, "16384"),
                             ({"type": "embedding", "embedding_dim": 1_000_000}, "4096"),
                             ({"type": "transformer_block", "num_heads": 1000}, "64"),
                             ({"type": "lstm", "hidden_size": 64, "num_layers": 500}, "48"),
                             ({"type": "conv2d", "filters": 100_000, "kernel_size": 3}, "2048")]:
            text = await err(client, "neural_node_deploy", {"cluster_id": cid, "model": "custom", "layers": [layer]})
            assert bound in text and "layers.0" in text, text
        assert (await ok(client, "neural_cluster_status", {"cluster_id": cid}))["nodes"] == []


@pytest.mark.anyio
async def test_a_model_over_the_budget_is_refused_before_it_starts(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "big", "architecture": "mlp"}))["cluster_id"]
        nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "model": "custom", "layers": BIG_MLP,
                                                         "count": 2}))["nodes"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        before = {n["pid"]: rss_mb(n["pid"]) for n in nodes}
        text = await err(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 1})
        for part in ("64,608,010 parameters", "MB per node", "over the 400 MB (memory_mb)", "memory_mb >="):
            assert part in text, text
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["status"] == "connected" and status.get("training") is None  # no session started
        for pid, mb in before.items():  # the 246 MB of weights were never allocated
            assert pid_alive(pid) and rss_mb(pid) - mb < 150, (mb, rss_mb(pid))
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


@pytest.mark.anyio
async def test_a_node_past_its_memory_limit_is_stopped_and_named(home, monkeypatch):
    settings = Settings.from_env(home)
    service = ClusterService(settings)
    async with Client(build_server(settings, service=service)) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "over", "architecture": "mlp"}))["cluster_id"]
        deployed = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2, "memory_mb": 256}))["nodes"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 300})
        assert run["data"]["parameters"] > 0 and run["data"]["estimated_train_mb"] < 256
        victim = deployed[1]
        for _ in range(600):
            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            if (status.get("current_epoch") or 0) >= 1:
                break
            await anyio.sleep(0.05)
        assert all(n["status"] == "running" for n in status["nodes"])  # within budget: untouched

        # Its budget shrinks under its feet (and the runtime allowance with it): the monitor stops it.
        monkeypatch.setattr(budget, "NODE_RUNTIME_MB", 0)
        current = service.store.node(victim["node_id"])
        service.store.update(Node, victim["node_id"], options={**current.options, "memory_mb": 64})
        deadline = time.monotonic() + 60
        while pid_alive(victim["pid"]) and time.monotonic() < deadline:
            await anyio.sleep(0.2)
        assert not pid_alive(victim["pid"])

        for _ in range(300):
            session = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
            if session["status"] != "running":
                break
            await anyio.sleep(0.2)
        assert session["status"] == "failed"
        assert victim["node_id"] in session["error"] and "resident memory" in session["error"], session["error"]
        events = (await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"],
                                                                   "limit": 500, "wait_s": 0}))["events"]
        over = [e for e in events if e["kind"] == "node_over_memory"]
        assert len(over) == 1 and over[0]["node_id"] == victim["node_id"]
        assert over[0]["data"]["rss_mb"] > over[0]["data"]["limit_mb"] == 96
        assert victim["node_id"] in over[0]["message"] and "MB" in over[0]["message"]
        assert pid_alive(deployed[0]["pid"])  # only the node over its budget
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
