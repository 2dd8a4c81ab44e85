"""Prometheus text for the controller's state; the HTTP front-end serves it at ``/metrics``.

Everything comes from memory: the nodes' last telemetry pushes (service.telemetry) and the
running sessions' live views (service.training). A scrape calls no node and reads no database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flow_nexus_server.service.telemetry import Telemetry
from flow_nexus_server.states import SessionState

if TYPE_CHECKING:
    from flow_nexus_server.service.clusters import ClusterService
    from flow_nexus_server.service.training import TrainingService

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the /metrics reply's Content-Type
NODE_LABELS = ["cluster_id", "node_id", "role"]
SESSION_LABELS = ["cluster_id", "session_id", "mode"]


def render_metrics(clusters: ClusterService, training: TrainingService) -> bytes:
    """The Prometheus text exposition of the nodes, the running sessions and the counts."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(clusters, training))
    return generate_latest(registry)


class ControllerCollector(Collector):
    def __init__(self, clusters: ClusterService, training: TrainingService) -> None:
        self.clusters = clusters
        self.training = training

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._nodes()
        yield from self._sessions()

    def _nodes(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        reports = self.clusters.telemetry.reports()
        up = GaugeMetricFamily("flow_nexus_node_up", "1 while the node pushes telemetry (its last push is at most "
                                                     "NODE_SILENT_S old), else 0", labels=NODE_LABELS)
        rss = GaugeMetricFamily("flow_nexus_node_rss_bytes", "Resident memory of the node process, as last pushed",
                                labels=NODE_LABELS)
        age = GaugeMetricFamily("flow_nexus_node_heartbeat_age_seconds", "Seconds since the node's last push",
                                labels=NODE_LABELS)
        per_cluster = GaugeMetricFamily("flow_nexus_cluster_nodes", "Nodes of a cluster the controller hears "
                                        "from, by whether they are up", labels=["cluster_id", "up"])
        counts: dict[tuple[str, str], int] = {}
        for node_id, report in sorted(reports.items()):
            labels = [report.cluster_id, node_id, report.health.role]
            fresh = Telemetry.fresh(report, now)
            up.add_metric(labels, 1.0 if fresh else 0.0)
            rss.add_metric(labels, float(report.health.rss_bytes))
            age.add_metric(labels, max(0.0, now - report.seen))
            key = (report.cluster_id, "1" if fresh else "0")
            counts[key] = counts.get(key, 0) + 1
        for (cluster_id, is_up), n in sorted(counts.items()):
            per_cluster.add_metric([cluster_id, is_up], float(n))
        clusters = GaugeMetricFamily("flow_nexus_clusters", "Clusters with at least one node reporting",
                                     value=float(len({cid for cid, _ in counts})))
        yield from (up, rss, age, per_cluster, clusters)

    def _sessions(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"flow_nexus_session_{name}", doc, labels=SESSION_LABELS)

        epoch = gauge("epoch", "Epoch (or federated round) the session is in")
        step = gauge("step", "Global training steps done")
        progress = gauge("progress_ratio", "Share of the session done, 0..1")
        loss = gauge("loss", "Latest training loss")
        accuracy = gauge("accuracy", "Latest validation accuracy (training accuracy without a validation split)")
        speed = gauge("samples_per_second", "Training samples per second over the last epoch or round")
        restarts = gauge("restarts", "Times the session was restarted (auto-healing, raft takeover)")
        running = [live for live in list(self.training.live.values()) if live.status == SessionState.RUNNING]
        for live in running:
            view = live.view()
            labels = [live.cluster_id, live.session_id, live.mode]
            epoch.add_metric(labels, float(view.epoch))
            step.add_metric(labels, float(view.step))
            progress.add_metric(labels, view.progress_pct / 100)
            restarts.add_metric(labels, float(view.restarts))
            figures = view.metrics
            for family, value in ((loss, figures.get("loss")),
                                  (accuracy, figures.get("val_accuracy", figures.get("accuracy"))),
                                  (speed, figures.get("samples_per_s"))):
                if value is not None:
                    family.add_metric(labels, float(value))
        total = GaugeMetricFamily("flow_nexus_sessions_running", "Training sessions running now",
                                  value=float(len(running)))
        yield from (epoch, step, progress, loss, accuracy, speed, restarts, total)
