"""TensorBoard event files: a finished session's files, read with tensorboard's own reader, hold
the session's history (every epoch's metrics and each worker's local loss) and its options."""

from __future__ import annotations

import stat

import pytest
from conftest import ok
from mcp import Client
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def test_event_files_hold_the_sessions_history(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "tb"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 2, "batch_size": 64, "learning_rate": 0.02,
            "federated": True, "local_epochs": 1, "wait": True})
        assert run["status"] == "completed"
        status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})

    logdir = home / "tensorboard" / run["session_id"]
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    history = status["history"]
    assert len(history["val_accuracy"]) == 2 and any(k.startswith("local_loss/") for k in history)
    for name, points in history.items():
        tag = f"workers/{name.split('/', 1)[1]}/local_loss" if name.startswith("local_loss/") else name
        written = events.Scalars(tag)
        assert [e.step for e in written] == [epoch for epoch, _step, _value in points], tag
        # TensorBoard keeps float32: equal to that precision.
        assert [e.value for e in written] == pytest.approx([value for _e, _s, value in points], rel=1e-6), tag

    # The session's options as hparams, and its end.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["epochs"].number_value == 2 and hparams["learning_rate"].number_value == pytest.approx(0.02)
    assert hparams["dataset"].string_value == "digits" and hparams["mode"].string_value == "federated"
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS

    # Private, like everything in the home.
    files = [p for p in logdir.rglob("*")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in files)
    assert stat.S_IMODE(logdir.stat().st_mode) == 0o700
