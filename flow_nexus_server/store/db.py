"""Engine and session factory; SQLite in WAL mode by default, any SQLAlchemy URL otherwise."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, make_url, select
from sqlalchemy.orm import Session, sessionmaker

from flow_nexus_server.states import LIVE_NODE_STATES, move
from flow_nexus_server.store.migrations import upgrade as upgrade_schema
from flow_nexus_server.store.tables import Checkpoint, Cluster, Event, Node, TrainingSession

# Rows whose every change moves Store.version: what in-memory reads (status) keep copies of.
VERSIONED = (Cluster, Node, TrainingSession)


class Store:
    def __init__(self, url: str) -> None:
        is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
        if is_sqlite:
            _create_private_file(make_url(url).database)
        self.engine = create_engine(url, connect_args=connect_args)
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        upgrade_schema(self.engine)  # a new database is built, an older one migrated, rows kept
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Moves after each commit that wrote a cluster, node or session row: a copy read at an
        # earlier version may be stale, one read at this version is not.
        self.version = 0
        self._version_lock = threading.Lock()
        event.listen(self._sessions, "after_flush", _note_versioned_writes)
        event.listen(self._sessions, "after_commit", self._after_commit)
        event.listen(self._sessions, "after_rollback", lambda s: s.info.pop("versioned_write", None))

    def _after_commit(self, session: Session) -> None:
        if session.info.pop("versioned_write", False):
            with self._version_lock:
                self.version += 1

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    # Small queries used in many places.
    def cluster(self, cluster_id: str) -> Cluster | None:
        with self.session() as s:
            return s.get(Cluster, cluster_id)

    def nodes(self, cluster_id: str, *, live_only: bool = True) -> list[Node]:
        with self.session() as s:
            q = select(Node).where(Node.cluster_id == cluster_id).order_by(Node.seq)
            if live_only:
                q = q.where(Node.status.in_(LIVE_NODE_STATES))
            return list(s.scalars(q))

    def all_live_nodes(self) -> list[Node]:
        with self.session() as s:
            return list(s.scalars(select(Node).where(Node.status.in_(LIVE_NODE_STATES))))

    def node(self, node_id: str) -> Node | None:
        with self.session() as s:
            return s.get(Node, node_id)

    def update(self, obj_type: type, obj_id: str, **values: Any) -> None:
        """Set columns of one row; a new ``status`` must be a move its table allows (states.move)."""
        with self.session() as s:
            obj = s.get(obj_type, obj_id)
            if obj is None:
                raise KeyError(obj_id)
            if "status" in values:
                move(obj, values.pop("status"))
            for k, v in values.items():
                setattr(obj, k, v)

    def add_event(self, cluster_id: str, kind: str, message: str, *, node_id: str | None = None,
                  session_id: str | None = None, data: dict[str, Any] | None = None) -> None:
        with self.session() as s:
            s.add(Event(cluster_id=cluster_id, kind=kind, message=message, node_id=node_id,
                        session_id=session_id, data=data))

    def session_events(self, session_id: str, after_id: int = 0, limit: int = 200) -> list[Event]:
        with self.session() as s:
            q = (select(Event).where(Event.session_id == session_id, Event.id > after_id)
                 .order_by(Event.id).limit(limit))
            return list(s.scalars(q))

    def new_event_sessions(self, after_id: int) -> tuple[int, set[str]]:
        """(highest event id, sessions with events after ``after_id``): feeds resource-updated notices."""
        with self.session() as s:
            rows = s.execute(select(Event.id, Event.session_id).where(Event.id > after_id)).all()
        top = max((row[0] for row in rows), default=after_id)
        return top, {row[1] for row in rows if row[1]}

    def recent_ids(self, *tables: type, prefix: str = "", cluster_id: str | None = None,
                   limit: int = 100) -> list[str]:
        """Ids of rows of ``tables`` starting with ``prefix``, newest first: argument completion.
        ``cluster_id`` keeps the rows of that cluster (tables with a cluster_id column); deleted
        checkpoints are left out."""
        found: list[tuple[float, str]] = []
        with self.session() as s:
            for table in tables:
                q = select(table.created_at, table.id).where(table.id.startswith(prefix, autoescape=True))
                if cluster_id is not None and hasattr(table, "cluster_id"):
                    q = q.where(table.cluster_id == cluster_id)
                if table is Checkpoint:
                    q = q.where(Checkpoint.deleted.is_(False))
                found += s.execute(q.order_by(table.created_at.desc()).limit(limit)).all()
        return [row_id for _, row_id in sorted(found, reverse=True)[:limit]]

    def close(self) -> None:
        self.engine.dispose()


def _note_versioned_writes(session: Session, _context: Any) -> None:
    if any(isinstance(obj, VERSIONED) for obj in (*session.new, *session.dirty, *session.deleted)):
        session.info["versioned_write"] = True


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _create_private_file(database: str | None) -> None:
    """Create a SQLite file 0600 before SQLite does (it would use 0644 less the umask); its -wal
    and -shm files take the database file's mode. Holds the cluster tokens: owner only."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
