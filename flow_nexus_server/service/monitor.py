"""Watches every live node: a dead process or a node silent for too long is marked failed.

One small loop for the whole server (like torch.distributed.elastic's agent loop): poll the
launcher for process exit, ask the node for its health, and record what changed.
"""

from __future__ import annotations

import logging
import threading
import time

from flow_nexus_server.service.clusters import ClusterService, parallel
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.store import Node

log = logging.getLogger(__name__)


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
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:
                log.exception("node monitor pass failed")

    def check_once(self) -> None:
        parallel(self._check, self.clusters.store.all_live_nodes())

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
        except NodeRequestError as exc:
            seen = self.clusters.last_seen.get(node.id)
            if seen is not None and time.time() - seen > self.silent_limit_s:
                self.clusters.node_lost(cluster, node, f"no answer for {time.time() - seen:.0f} s ({exc})")
                # A hung process is of no use and must not linger: stop it.
                self.clusters.launcher(cluster).terminate(self.clusters.handle(node), grace_s=2)
