"""Watches every live node: a dead process, a node silent for too long, or one whose resident
memory passed its budget (service.budget) is marked failed; the last two are stopped.

One small loop for the whole server (like torch.distributed.elastic's agent loop): poll the
launcher for process exit, ask the node for its health, and record what changed. A failing pass
(a damaged database) is logged and retried with a back-off; it never ends the server.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select

from flow_nexus_server.service.budget import node_memory_mb, over_memory
from flow_nexus_server.service.clusters import ClusterService, parallel
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.store import Cluster, Node, TrainingSession

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class NodeMonitor:
    # Worst case for a hung node: silent_limit + interval + the 2 s health timeout < 10 s.
    def __init__(self, clusters: ClusterService, interval_s: float = 1.5, silent_limit_s: float = 6.0) -> None:
        self.clusters = clusters
        self.interval_s = interval_s
        self.silent_limit_s = silent_limit_s
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

    def _check(self, node: Node) -> None:
        cluster = self.clusters.store.cluster(node.cluster_id)
        if cluster is None or node.status != "running" or not node.port:
            return
        alive, code = self.clusters.launcher(cluster).is_alive(self.clusters.handle(node))
        if not alive:
            reason = f"process {node.pid} exited" + (f" with code {code}" if code is not None else "")
            self.clusters.node_lost(cluster, node, reason)
            return
        try:
            health = self.clusters.client(cluster, node).health(timeout=2)
            self.clusters.last_seen[node.id] = time.time()
            self.clusters.health_cache[node.id] = health
            self._check_memory(cluster, node, health.rss_bytes)
        except NodeRequestError as exc:
            seen = self.clusters.last_seen.get(node.id)
            if seen is not None and time.time() - seen > self.silent_limit_s:
                self.clusters.node_lost(cluster, node, f"no answer for {time.time() - seen:.0f} s ({exc})")
                # A hung process is of no use and must not linger: stop it.
                self.clusters.launcher(cluster).terminate(self.clusters.handle(node), grace_s=2)

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
                                                             TrainingSession.status == "running"))
