"""The state database's migrations: a database made by 0.1.0 is upgraded in place with every row,
a new one is built at head (0600), and the migrations build exactly the tables the code declares
(a new database gets those tables directly)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, select

from flow_nexus_server.store import Cluster, Event, Node, Store, TrainingSession
from flow_nexus_server.store.migrations import BASELINE, HEAD, SCRIPTS, current_revision
from flow_nexus_server.store.tables import Base

FIXTURE = Path(__file__).parent / "fixtures" / "state-v0.1.0.sql"
CLUSTER, SESSION = "dnc_0123456789ab", "train_0123456789"


def database_of_0_1_0(path: Path) -> str:
    """A state.db as flow-nexus-server 0.1.0 left it: tables and rows, no alembic_version."""
    with sqlite3.connect(path) as con:
        con.executescript(FIXTURE.read_text(encoding="utf-8"))
    con.close()
    return f"sqlite:///{path}"


def revision_and_drift(store: Store) -> tuple[str | None, list]:
    """(the database's revision, how its tables differ from the declared ones)."""
    with store.engine.connect() as conn:
        return current_revision(conn), compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_head_and_baseline_name_the_scripts():
    scripts = ScriptDirectory.from_config(Config(str(SCRIPTS / "alembic.ini")))
    assert scripts.get_heads() == [HEAD]
    assert scripts.get_revision(BASELINE).down_revision is None


def test_the_migrations_build_the_declared_tables(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    config = Config(str(SCRIPTS / "alembic.ini"))
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
        with engine.connect() as conn:
            assert current_revision(conn) == HEAD
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_a_database_of_0_1_0_reaches_head_with_its_rows(tmp_path):
    store = Store(database_of_0_1_0(tmp_path / "state.db"))
    try:
        assert revision_and_drift(store) == (HEAD, [])
        cluster = store.cluster(CLUSTER)
        assert (cluster.name, cluster.status, cluster.token, cluster.generation, cluster.options) == (
            "legacy", "active", "t" * 64, 2, {"idle_timeout_min": 30.0})
        [node] = store.nodes(CLUSTER, live_only=False)
        assert (node.id, node.status, node.capabilities, node.options) == (
            "node_0123abcd", "stopped", ["training"], {"memory_mb": 400})
        with store.session() as s:
            session = s.get(TrainingSession, SESSION)
            assert (session.status, session.config, session.final_metrics, session.finished_at) == (
                "completed", {"epochs": 3, "dataset": "digits"}, {"accuracy": 0.91}, 1764000042.5)
            [event] = s.scalars(select(Event).where(Event.session_id == SESSION))
            assert (event.kind, event.data) == ("training_completed", {"epochs": 3})
        with store.session() as s:  # and it takes new rows as any database does
            s.add(Node(id="node_new", cluster_id=CLUSTER, seq=1, role="worker", status="starting", model="mlp",
                       capabilities=[], options={}, sandbox="/tmp/x"))
        assert [n.id for n in store.nodes(CLUSTER, live_only=False)] == ["node_0123abcd", "node_new"]
    finally:
        store.close()
    reopened = Store(f"sqlite:///{tmp_path / 'state.db'}")  # at head: opened as it is
    try:
        assert reopened.cluster(CLUSTER).name == "legacy" and len(reopened.nodes(CLUSTER, live_only=False)) == 2
    finally:
        reopened.close()


def test_a_new_database_is_built_at_head_and_private(tmp_path):
    old = os.umask(0o022)
    try:
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    finally:
        os.umask(old)
    try:
        assert revision_and_drift(store) == (HEAD, [])
        with store.engine.connect() as conn:  # stamped as alembic itself reads it
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
        with store.session() as s:
            assert s.scalars(select(Cluster)).all() == []
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        assert modes and set(modes.values()) == {0o600}, modes  # state.db and its -wal/-shm
    finally:
        store.close()


def test_processes_opening_a_new_database_at_once_all_find_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    stores: list[Store] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            stores.append(Store(url))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(stores) == 4
        assert {revision_and_drift(s)[0] for s in stores} == {HEAD}
    finally:
        for s in stores:
            s.close()


def test_a_database_of_a_newer_release_is_refused_clearly(tmp_path):
    path = tmp_path / "state.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE alembic_version SET version_num = 'ffff'")
    con.close()
    with pytest.raises(RuntimeError, match="newer flow-nexus-server"):
        Store(f"sqlite:///{path}")
