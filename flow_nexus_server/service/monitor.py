"""The one place that decides a node is lost: its process is gone, it has not pushed telemetry
for NODE_SILENT_S, or its resident memory passed its budget (service.budget); the last two are
also stopped. Each goes through ClusterService.node_lost: one record, one node_failed event, and
the listeners (a running session fails, heals or hands over raft) told once.

One small loop for the whole controller (like torch.distributed.elastic's agent loop): ask the
launcher whether each process runs and read what the node last pushed (service.telemetry); no
node is called. A failing pass (a damaged database) is logged and retried with a back-off; it
never ends the controller.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select

from flow_nexus_server.service.budget import node_memory_mb, over_memory
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.telemetry import NODE_SILENT_S
from flow_nexus_server.states import NodeState, SessionState
from flow_nexus_server.store import Cluster, Node, TrainingSession

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class NodeMonitor:
    # A hung node is declared lost NODE_SILENT_S after its last push, plus at most one interval.
    def __init__(self, clusters: ClusterService, interval_s: float = 1.0,
                 silent_limit_s: float = NODE_SILENT_S) -> None:
        self.clusters = clusters
        self.interval_s = interval_s
        self.silent_limit_s = silent_limit_s
        self._checked_push: dict[str, float] = {}  # node_id -> the push whose rss was last checked
        self._first_seen: dict[str, float] = {}  # node_id -> when a node with no report was first met
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.wait(delay):
            try:
                self.check_once()
                delay = self.interval_s
            except Exception:
                delay = min(delay * 2, MAX_BACKOFF_S)
                log.exception("node monitor pass failed; next pass in %.0f s", delay)

    def check_once(self) -> None:
        nodes = self.clusters.store.all_live_nodes()
        for node, result in zip(nodes, parallel(self._check, nodes)):
            if isinstance(result, Exception):
                log.error("checking node %s failed", node.id, exc_info=result)
        live = {n.id for n in nodes}
        for seen in (self._checked_push, self._first_seen):
            for node_id in [k for k in seen if k not in live]:
                del seen[node_id]

    def _check(self, node: Node) -> None:
        cluster = self.clusters.store.cluster(node.cluster_id)
        if cluster is None or node.status != NodeState.RUNNING or not node.port:
            return
        alive, code = self.clusters.launcher(cluster).is_alive(self.clusters.handle(node))
        if not alive:
            reason = f"process {node.pid} exited" + (f" with code {code}" if code is not None else "")
            self.clusters.node_lost(cluster, node, reason)
            return
        report = self.clusters.telemetry.report(node.id)
        if report is None:  # not heard of since this controller started: the silence counts from now
            self._first_seen.setdefault(node.id, time.time())
        seen = report.seen if report is not None else self._first_seen[node.id]
        silent = time.time() - seen
        if silent > self.silent_limit_s:
            self.clusters.node_lost(cluster, node, f"no answer: no telemetry push for {silent:.0f} s")
            # A hung process is of no use and must not linger: stop it.
            self.clusters.launcher(cluster).terminate(self.clusters.handle(node), grace_s=2)
            return
        if report is not None and self._checked_push.get(node.id) != report.seen:
            self._checked_push[node.id] = report.seen
            self._check_memory(cluster, node, report.health.rss_bytes)

    def _check_memory(self, cluster: Cluster, node: Node, rss_bytes: int) -> None:
        """Stop a node whose resident memory passed its limit, before it takes the host down; a
        session running on it fails naming it (or heals, with auto_healing)."""
        over = over_memory(node, rss_bytes, self.clusters.settings)
        if over is None:
            return
        rss_mb, limit_mb = over
        memory_mb = node_memory_mb(node, self.clusters.settings)
        reason = (f"stopped by the server: its resident memory {rss_mb:,.0f} MB passed its limit of {limit_mb:,.0f} MB "
                  f"(set by memory_mb {memory_mb:,})")
        log.warning("node %s of %s %s", node.id, cluster.id, reason)
        self.clusters.event(cluster.id, "node_over_memory",
                            f"node {node.id} ({node.role}) {reason}; deploy nodes with a larger memory_mb or train "
                            "a smaller model", node_id=node.id, session_id=self._running_session(cluster.id),
                            data={"rss_mb": round(rss_mb, 1), "limit_mb": round(limit_mb, 1), "memory_mb": memory_mb})
        self.clusters.node_lost(cluster, node, reason)
        self.clusters.launcher(cluster).terminate(self.clusters.handle(node), grace_s=2)

    def _running_session(self, cluster_id: str) -> str | None:
        with self.clusters.store.session() as s:
            return s.scalar(select(TrainingSession.id).where(TrainingSession.cluster_id == cluster_id,
                                                             TrainingSession.status == SessionState.RUNNING))
