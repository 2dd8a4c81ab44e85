"""Cluster, node and session states: each table lets its legal moves through, refuses the rest
without writing anything, and gives terminal states no way out; the stored values stay the
plain strings older state.db files hold. Last, a finished session's elapsed time stops growing."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from conftest import ok
from mcp import Client
from sqlalchemy import text

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.states import (
    CLUSTER_MOVES,
    NODE_MOVES,
    SESSION_MOVES,
    ClusterState,
    IllegalTransition,
    NodeState,
    SessionState,
    is_terminal,
    move,
    transition,
)
from flow_nexus_server.store import Cluster, Node, Store, TrainingSession

TABLES = [(ClusterState, CLUSTER_MOVES), (NodeState, NODE_MOVES), (SessionState, SESSION_MOVES)]


@pytest.mark.parametrize("kind,table", TABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_each_table_has_one_row_per_state_and_only_its_own_states(kind, table):
    assert set(table) == set(kind)
    assert all(targets <= set(kind) for targets in table.values())


@pytest.mark.parametrize("kind,table", TABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_legal_moves_and_staying_pass(kind, table):
    for source, targets in table.items():
        assert transition(source.value, source, "x") is source  # staying is no move
        for target in targets:
            assert transition(source.value, target, "x") is target


@pytest.mark.parametrize("kind,table,terminal", [
    (ClusterState, CLUSTER_MOVES, {"terminated"}),
    (NodeState, NODE_MOVES, {"failed", "lost", "removed", "stopped"}),
    (SessionState, SESSION_MOVES, {"completed", "failed", "stopped", "interrupted"}),
], ids=["cluster", "node", "session"])
def test_terminal_states_have_no_way_out(kind, table, terminal):
    assert {s.value for s in kind if is_terminal(s)} == terminal
    for source in map(kind, terminal):
        for target in set(kind) - {source}:
            with pytest.raises(IllegalTransition, match=f"is {source} and cannot become {target}"):
                transition(source, target, "x")


def test_a_value_this_release_does_not_know_is_refused():
    with pytest.raises(IllegalTransition):
        transition("exploded", ClusterState.CONNECTED, "dnc_x")
    with pytest.raises(TypeError):  # a plain string is no state: the table to check would be unknown
        transition("ready", "connected", "dnc_x")


# ----------------------------------------------------------------- through the store

@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def add_cluster(store: Store, status: str = "initializing") -> str:
    with store.session() as s:
        s.add(Cluster(id="dnc_1", name="c", status=status, topology="mesh", architecture="mlp", consensus="raft",
                      launcher="subprocess", backend="auto", max_nodes=4, auto_healing=False, token="t",
                      directory="/nowhere"))
    return "dnc_1"


def add_node(store: Store, cluster_id: str, status: str = "starting") -> str:
    with store.session() as s:
        s.add(Node(id="node_1", cluster_id=cluster_id, seq=0, role="worker", status=status, model="base",
                   capabilities=["training"], sandbox="/nowhere/node_1"))
    return "node_1"


def raw_status(store: Store, table: str, row_id: str) -> str:
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT status FROM {table} WHERE id = :id"), {"id": row_id}).scalar_one()


def test_a_terminated_cluster_cannot_be_connected_or_trained_again(store):
    cid = add_cluster(store)
    for state in (ClusterState.READY, ClusterState.CONNECTED, ClusterState.TRAINING, ClusterState.CONNECTED,
                  ClusterState.TERMINATED):
        store.update(Cluster, cid, status=state)
    for state in (ClusterState.CONNECTED, ClusterState.TRAINING, ClusterState.READY):
        with pytest.raises(IllegalTransition, match="cluster dnc_1 is terminated and cannot become"):
            store.update(Cluster, cid, status=state, needs_connect_reason="should not be written")
    assert raw_status(store, "clusters", cid) == "terminated"
    assert store.cluster(cid).needs_connect_reason is None  # the refused update wrote nothing at all


def test_a_cluster_still_initializing_cannot_start_training(store):
    cid = add_cluster(store)
    with pytest.raises(IllegalTransition):
        store.update(Cluster, cid, status=ClusterState.TRAINING)
    assert raw_status(store, "clusters", cid) == "initializing"


def test_a_failed_or_stopped_node_cannot_come_back_running(store):
    nid = add_node(store, add_cluster(store))
    store.update(Node, nid, status=NodeState.RUNNING)
    store.update(Node, nid, status=NodeState.FAILED)
    for state in (NodeState.RUNNING, NodeState.STARTING, NodeState.STOPPED):
        with pytest.raises(IllegalTransition, match="node node_1 is failed"):
            store.update(Node, nid, status=state)
    assert raw_status(store, "nodes", nid) == "failed"


def test_an_ended_session_cannot_run_again(store):
    cid = add_cluster(store)
    with store.session() as s:
        s.add(TrainingSession(id="train_1", cluster_id=cid, status=SessionState.RUNNING, config={}))
    with store.session() as s:
        move(s.get(TrainingSession, "train_1"), SessionState.COMPLETED)
    for state in (SessionState.RUNNING, SessionState.INTERRUPTED, SessionState.FAILED):
        with pytest.raises(IllegalTransition, match="session train_1 is completed"), store.session() as s:
            move(s.get(TrainingSession, "train_1"), state)
    assert raw_status(store, "training_sessions", "train_1") == "completed"


def test_stored_values_stay_the_plain_strings(store):
    """Rows written as plain strings (an existing state.db) read and move; enums are stored as their value."""
    cid = add_cluster(store, status="connected")
    nid = add_node(store, cid, status="running")
    assert store.cluster(cid).status == ClusterState.CONNECTED and store.node(nid).status in (NodeState.RUNNING,)
    store.update(Cluster, cid, status=ClusterState.NEEDS_CONNECT)
    store.update(Node, nid, status=NodeState.LOST)
    assert raw_status(store, "clusters", cid) == "needs_connect" and raw_status(store, "nodes", nid) == "lost"
    assert [n.id for n in store.nodes(cid)] == []  # the live-node query matches on the stored strings


# ------------------------------------------------------------- elapsed after the end

@pytest.mark.anyio
async def test_elapsed_stops_growing_once_the_session_ended(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "elapsed", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker"})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "epochs": 1, "wait": True})
        assert run["status"] == "completed", run
        first = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        await anyio.sleep(2.5)
        later = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        assert later["live"]["elapsed_s"] == first["live"]["elapsed_s"] == run["result"]["elapsed_s"]
        assert later["final_metrics"]["elapsed_s"] == later["live"]["elapsed_s"]
        # elapsed = end - start: no more than the recorded span of the session, and well short of now
        span = later["finished_at"] - later["created_at"]
        assert later["live"]["elapsed_s"] <= span + 0.01
        assert time.time() - later["created_at"] >= later["live"]["elapsed_s"] + 2.5
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
