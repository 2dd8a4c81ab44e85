"""Issue 11, findings 7 and 8: a background failure never ends the server or its nodes, and inputs
that used to get a bare "Error executing tool X" get a sentence naming the problem."""

from __future__ import annotations

import logging
import sqlite3

import anyio
import pytest
from conftest import err, ok, pid_alive
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.training import TrainingService

pytestmark = pytest.mark.anyio


async def sentence(client: Client, tool: str, args: dict, *expected: str) -> str:
    """The tool fails with a sentence of its own (not the SDK's bare text) holding ``expected``."""
    text = await err(client, tool, args)
    assert text.strip() != f"Error executing tool {tool}", f"{tool}: bare error"
    for part in expected:
        assert part in text, f"{tool}: {part!r} not in {text!r}"
    return text


async def test_opaque_inputs_get_a_sentence(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "errors", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 1,
                                                            "wait": True})
        assert run["status"] == "completed"

        # An export destination that is a file, or lies under one: nothing is written.
        a_file = home / "a-file"
        a_file.write_text("mine")
        await sentence(client, "neural_model_export", {"model_id": cid, "destination": str(a_file)}, "is a file")
        await sentence(client, "neural_model_export", {"model_id": cid, "destination": str(a_file / "sub")},
                       "lies under the file")
        assert a_file.read_text() == "mine"

        # Broken example files: the file and what is wrong in it are named.
        broken = home / "broken.json"
        broken.write_text('{"inputs": [1, 2')
        await sentence(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": str(broken)},
                       str(broken), "does not parse")
        lines = home / "broken.jsonl"
        lines.write_text('{"inputs": [0.0]}\n{oops\n')
        await sentence(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": str(lines)},
                       "line 2", "does not parse")
        table = home / "words.csv"
        table.write_text("a,b,label\n1,two,0\n")
        await sentence(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": str(table)},
                       "'b'", "not a number")

        # Deeply nested JSON (a RecursionError in the parser, or too deep for the node requests).
        deep = "[" * 100_000
        for tool, args in [("neural_predict_distributed", {"cluster_id": cid, "input_data": deep}),
                           ("neural_performance_benchmark", {"model_id": cid, "input_data": deep,
                                                             "benchmark_type": "inference"}),
                           ("neural_predict_distributed", {"cluster_id": cid, "input_data": "[" * 500 + "]" * 500})]:
            await sentence(client, tool, args, "nested")
        await sentence(client, "neural_train_distributed", {"cluster_id": cid, "dataset": deep}, "nested too deeply")

        # A cursor past SQLite's integers is refused by the schema, with the bound.
        await sentence(client, "execution_stream_subscribe",
                       {"deployment_id": run["session_id"], "cursor": 2**63, "wait_s": 0}, "cursor", str(2**62))
        assert (await ok(client, "execution_stream_subscribe",
                         {"deployment_id": run["session_id"], "cursor": 2**62, "wait_s": 0}))["events"] == []
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_an_unexpected_error_is_logged_and_named(home, monkeypatch, caplog):
    def broken(self, include_terminated=True):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(ClusterService, "list_clusters", broken)
    with caplog.at_level(logging.ERROR, logger="flow_nexus_server.server"):
        async with Client(build_server(Settings.from_env(home))) as client:
            text = await sentence(client, "neural_cluster_list", {},
                                  "internal error in neural_cluster_list", "RuntimeError", "server.log")
            assert "secret internal detail" not in text
    logged = [r for r in caplog.records if "unexpected error in neural_cluster_list" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback


async def test_a_damaged_database_stops_neither_the_server_nor_its_nodes(home, monkeypatch, caplog):
    settings = Settings.from_env(home)
    service = ClusterService(settings)
    calls = {"pass": 0}
    real_pass = TrainingService._watch_once

    def flaky_pass(self, *args):  # the first passes of the session watcher fail
        calls["pass"] += 1
        if calls["pass"] <= 3:
            raise RuntimeError("database is locked")
        return real_pass(self, *args)

    def no_events(after_id):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(TrainingService, "_watch_once", flaky_pass)
    with caplog.at_level(logging.ERROR):
        async with Client(build_server(settings, service=service)) as client:
            cid = (await ok(client, "neural_cluster_init", {"name": "damaged", "architecture": "mlp"}))["cluster_id"]
            node = (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["nodes"][0]
            await ok(client, "neural_cluster_connect", {"cluster_id": cid})

            # A watcher pass that fails is retried: the session still completes.
            run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 2,
                                                                "wait": True, "wait_timeout_s": 120})
            assert run["status"] == "completed" and calls["pass"] > 3

            # The event publisher fails, then the events table is gone altogether.
            monkeypatch.setattr(service.store, "new_event_sessions", no_events)
            await anyio.sleep(2)
            with sqlite3.connect(home / "state.db") as db:
                db.execute("DROP TABLE events")
            await anyio.sleep(3)  # a few monitor passes and publisher retries

            status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
            assert [n["status"] for n in status["nodes"]] == ["running"] and pid_alive(node["pid"])
            assert (await ok(client, "neural_cluster_list", {}))["count"] == 1
            gone = await ok(client, "neural_cluster_terminate", {"cluster_id": cid})  # its events go to the log
            assert gone["success"] and not pid_alive(node["pid"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("publishing session event notices failed" in m for m in messages)
    assert any(f"watching session {run['session_id']} failed" in m for m in messages)
