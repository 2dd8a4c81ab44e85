"""What the dashboard page shows, read from the controller's memory and its store.

``DashboardFeed.stream`` is the page's server-sent-event feed: one ``snapshot`` (clusters with
their nodes, recent sessions, checkpoints, the curves' points so far, the last events), then at
most ``1 / FEED_INTERVAL_S`` ``delta`` messages a second, each sent only when something changed:
the state (small: it is re-sent whole), and the metric points and events added since the last
message (read by id, so each row crosses the wire once). Node figures come from the nodes'
telemetry pushes (service.telemetry), live session figures from the training service's memory;
no node is called. Nothing secret is read: no cluster token, no data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import select

from flow_nexus_server.states import ClusterState
from flow_nexus_server.store import Checkpoint, Cluster, Event, MetricSample, Node, TrainingSession

if TYPE_CHECKING:
    from flow_nexus_server.service.clusters import ClusterService
    from flow_nexus_server.service.training import TrainingService

FEED_INTERVAL_S = 0.5  # at most two messages a second per page
KEEPALIVE_S = 15.0  # a comment line on a quiet feed, so proxies and the browser keep it open
RECENT_SESSIONS = 20
RECENT_CLUSTERS = 5  # terminated clusters still listed
RECENT_CHECKPOINTS = 30
FIRST_EVENTS = 100
MAX_POINTS = 50_000  # points in the first snapshot (the newest kept)
CONFIG_SHOWN = ("dataset", "architecture", "model", "mode", "topology", "epochs", "rounds", "batch_size",
                "learning_rate", "optimizer", "federated")


class DashboardFeed:
    def __init__(self, clusters: ClusterService, training: TrainingService) -> None:
        self.clusters = clusters
        self.training = training
        self.store = clusters.store

    # ------------------------------------------------------------------ reads (worker threads)
    def state(self) -> dict[str, Any]:
        """Clusters with their nodes, recent sessions (live figures for running ones), checkpoints."""
        reports = self.clusters.telemetry.reports()
        with self.store.session() as s:
            clusters = list(s.scalars(select(Cluster).where(Cluster.status != ClusterState.TERMINATED)
                                      .order_by(Cluster.created_at)))
            clusters += list(s.scalars(select(Cluster).where(Cluster.status == ClusterState.TERMINATED)
                                       .order_by(Cluster.terminated_at.desc()).limit(RECENT_CLUSTERS)))
            nodes = list(s.scalars(select(Node).where(Node.cluster_id.in_([c.id for c in clusters]))
                                   .order_by(Node.seq)))
            sessions = list(s.scalars(select(TrainingSession).order_by(TrainingSession.created_at.desc())
                                      .limit(RECENT_SESSIONS)))
            checkpoints = list(s.scalars(select(Checkpoint).order_by(Checkpoint.created_at.desc())
                                         .limit(RECENT_CHECKPOINTS)))
        return {
            "clusters": [{
                "cluster_id": c.id, "name": c.name, "status": c.status, "topology": c.topology,
                "consensus": c.consensus, "launcher": c.launcher, "created_at": c.created_at,
                "nodes": [_node(n, reports.get(n.id)) for n in nodes if n.cluster_id == c.id],
            } for c in clusters],
            "sessions": [self._session(t) for t in sessions],
            "checkpoints": [{"checkpoint_id": k.id, "session_id": k.session_id, "node_id": k.node_id,
                             "epoch": k.epoch, "path": k.path, "created_at": k.created_at, "deleted": k.deleted}
                            for k in checkpoints],
            "releases": None,  # no model registry in this server yet
        }

    def _session(self, row: TrainingSession) -> dict[str, Any]:
        live = self.training.live.get(row.id)
        out: dict[str, Any] = {
            "session_id": row.id, "cluster_id": row.cluster_id, "status": row.status,
            "config": {k: row.config.get(k) for k in CONFIG_SHOWN if k in row.config},
            "created_at": row.created_at, "finished_at": row.finished_at, "error": row.error,
            "final_metrics": {k: v for k, v in (row.final_metrics or {}).items() if isinstance(v, (int, float))},
        }
        if live is not None:
            view = live.view()
            out["live"] = {"status": view.status, "epoch": view.epoch, "total_epochs": view.total_epochs,
                           "progress_pct": view.progress_pct, "elapsed_s": view.elapsed_s, "eta_s": view.eta_s,
                           "metrics": view.metrics, "restarts": view.restarts, "error": view.error}
            out["status"] = view.status  # memory is ahead of the store by a moment at the end
        return out

    def points_after(self, after_id: int, limit: int | None = None) -> list[list[Any]]:
        """Metric points with a larger id: [id, session_id, node_id, name, epoch, value]; ``limit``
        keeps the newest."""
        with self.store.session() as s:
            q = select(MetricSample.id, MetricSample.session_id, MetricSample.node_id, MetricSample.name,
                       MetricSample.epoch, MetricSample.value).where(MetricSample.id > after_id)
            if limit is not None:
                rows = list(s.execute(q.order_by(MetricSample.id.desc()).limit(limit)).all())[::-1]
            else:
                rows = list(s.execute(q.order_by(MetricSample.id)).all())
        return [list(r) for r in rows]

    def events_after(self, after_id: int, limit: int | None = None) -> list[dict[str, Any]]:
        with self.store.session() as s:
            q = select(Event).where(Event.id > after_id)
            if limit is not None:
                rows = list(s.scalars(q.order_by(Event.id.desc()).limit(limit)))[::-1]
            else:
                rows = list(s.scalars(q.order_by(Event.id)))
        return [{"id": e.id, "time": e.time, "kind": e.kind, "message": e.message, "cluster_id": e.cluster_id,
                 "session_id": e.session_id, "node_id": e.node_id} for e in rows]

    # ------------------------------------------------------------------ the feed
    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: one snapshot, then deltas when something changed (at most 2/s)."""
        state = await anyio.to_thread.run_sync(self.state)
        points = await anyio.to_thread.run_sync(self.points_after, 0, MAX_POINTS)
        events = await anyio.to_thread.run_sync(self.events_after, 0, FIRST_EVENTS)
        point_top = points[-1][0] if points else 0
        event_top = events[-1]["id"] if events else 0
        sent_state = _dumps(state)
        yield _sse("snapshot", f'{{"now":{time.time()},"state":{sent_state},"points":{_dumps(points)},'
                               f'"events":{_dumps(events)}}}')
        quiet_since = time.monotonic()
        while True:
            await anyio.sleep(FEED_INTERVAL_S)
            state_text = _dumps(await anyio.to_thread.run_sync(self.state))
            points = await anyio.to_thread.run_sync(self.points_after, point_top)
            events = await anyio.to_thread.run_sync(self.events_after, event_top)
            changed = state_text != sent_state
            if not (changed or points or events):
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            point_top = points[-1][0] if points else point_top
            event_top = events[-1]["id"] if events else event_top
            parts = [f'"now":{time.time()}']
            if changed:
                parts.append(f'"state":{state_text}')
                sent_state = state_text
            if points:
                parts.append(f'"points":{_dumps(points)}')
            if events:
                parts.append(f'"events":{_dumps(events)}')
            quiet_since = time.monotonic()
            yield _sse("delta", "{" + ",".join(parts) + "}")


def _node(node: Node, report: Any) -> dict[str, Any]:
    health = report.health if report is not None else None
    return {"node_id": node.id, "role": node.role, "rank": node.rank, "host": node.host, "pid": node.pid,
            "status": node.status, "error": node.error,
            "rss_bytes": health.rss_bytes if health else None, "job_state": health.job_state if health else None,
            "seen": report.seen if report is not None else None}


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged loss) as null: the browser's JSON.parse takes no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False, default=str)


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()
