"""Clusters: create, look up, status from memory, list, terminate, close.

``ClusterService`` is the one object the rest of the server talks to; its jobs live in one
module each: ``service.nodes`` (node registry: deploy, replace, stop, remove, lost, re-attach),
``service.groups`` (group manager: connect, re-form, rendezvous, link benchmark) and
``service.sandbox`` (sandbox files: uploads, quotas, logs). Sessions are ``service.training``;
the one monitor loop is ``service.monitor``.

Every public method is synchronous and thread-safe (one lock per cluster); the MCP layer runs
them on worker threads so the event loop never blocks on a node or on the store.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from flow_nexus_server import replies as r
from flow_nexus_server.config import Settings
from flow_nexus_server.home import prepare_home
from flow_nexus_server.launchers import NodeHandle, NodeLauncher
from flow_nexus_server.launchers.docker import DockerLauncher
from flow_nexus_server.launchers.warm import local_launcher
from flow_nexus_server.service.backend import check_requested
from flow_nexus_server.service.errors import Conflict, NextStep, NotFound, ServiceError
from flow_nexus_server.service.groups import GroupManager
from flow_nexus_server.service.node_client import NodeClient
from flow_nexus_server.service.nodes import NodeRegistry, ray_launcher
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.sandbox import SandboxFiles
from flow_nexus_server.service.telemetry import Directory, Telemetry
from flow_nexus_server.service.topology import edges as topology_edges
from flow_nexus_server.states import FORMED_CLUSTER_STATES, LIVE_NODE_STATES, ClusterState, NodeState
from flow_nexus_server.store import Cluster, Node, Store, TrainingSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterRows:
    version: int  # Store.version they were read at
    cluster: Cluster
    nodes: list[Node]  # every node, in deploy order
    sessions: int  # training sessions ever started on the cluster


class ClusterService(NodeRegistry, GroupManager, SandboxFiles):
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        prepare_home(settings)  # before the store: the home is 0700 before the database lands in it
        self.store = store or Store(settings.db_url)
        self.launchers: dict[str, NodeLauncher] = {
            # On Linux, forks node agents from a template that has torch imported: ~0.1 s a node,
            # not ~2 s; elsewhere (or FLOW_NEXUS_SPAWNER=plain) one cold process per node.
            "subprocess": local_launcher(settings.home, settings.spawner),
            "docker": DockerLauncher(image=settings.docker_image, network=settings.docker_network),
            "ray": ray_launcher(settings),
        }
        # Nodes push their health and progress here every second; status and the monitor read it.
        self.telemetry = Telemetry(Directory(self._token_of, self._is_live_node), settings.advertise_host,
                                   port=settings.telemetry_port)
        # Told once per node the monitor (or anyone) declares lost: (cluster, node, reason).
        self.on_node_lost: list[Callable[[Cluster, Node, str], None]] = []
        # Asked when nodes join a cluster that is training: (cluster_id, what happened) -> True when a
        # running session takes them in at its next epoch / round boundary.
        self.on_training_membership: list[Callable[[str, str], bool]] = []
        # Asked when a node is removed from a cluster that is training: (cluster_id, node) -> True when a
        # running session lets it go at its next epoch / round boundary (raises ServiceError to refuse).
        self.on_training_leave: list[Callable[[str, Node], bool]] = []
        self._rows: dict[str, ClusterRows] = {}  # cluster_id -> what status last read of it
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._closed = False

    # ----------------------------------------------------------------- helpers
    def lock(self, cluster_id: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(cluster_id, threading.RLock())

    def get_cluster(self, cluster_id: str, *, active: bool = True) -> Cluster:
        cluster = self.store.cluster(cluster_id)
        if cluster is None:
            raise NotFound(
                f"cluster {cluster_id!r} does not exist", next_step=NextStep.LIST_CLUSTERS)
        if active and cluster.status == ClusterState.TERMINATED:
            raise Conflict(
                f"cluster {cluster_id} is terminated", next_step=NextStep.INIT_CLUSTER)
        return cluster

    def get_node(self, node_id: str) -> Node:
        node = self.store.node(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} does not exist", next_step=NextStep.LIST_NODES)
        return node

    def rows(self, cluster_id: str) -> ClusterRows:
        """The cluster's row, its nodes and its session count, re-read from the store only after a
        write to clusters, nodes or sessions (Store.version): status and the telemetry listener
        read memory. The rows are shared copies: read them, never change them."""
        version = self.store.version
        cached = self._rows.get(cluster_id)
        if cached is not None and cached.version == version:
            return cached
        cluster = self.get_cluster(cluster_id, active=False)
        nodes = self.store.nodes(cluster_id, live_only=False)
        with self.store.session() as s:
            sessions = s.scalar(select(func.count()).select_from(TrainingSession)
                                .where(TrainingSession.cluster_id == cluster_id)) or 0
        rows = ClusterRows(version, cluster, nodes, sessions)
        self._rows[cluster_id] = rows
        return rows

    def rows_cached(self, cluster_id: str) -> bool:
        """Whether status can answer from memory alone (no store read)."""
        cached = self._rows.get(cluster_id)
        return cached is not None and cached.version == self.store.version

    def _token_of(self, cluster_id: str) -> str | None:
        """The token nodes of this cluster push telemetry with; None when it is unknown or terminated."""
        try:
            cluster = self.rows(cluster_id).cluster
        except NotFound:
            return None
        return cluster.token if cluster.status != ClusterState.TERMINATED else None

    def _is_live_node(self, cluster_id: str, node_id: str) -> bool:
        return any(n.id == node_id and n.status in LIVE_NODE_STATES for n in self.rows(cluster_id).nodes)

    def client(self, cluster: Cluster, node: Node) -> NodeClient:
        assert node.host and node.port
        return NodeClient(node.id, node.host, node.port, cluster.token)

    def launcher(self, cluster: Cluster) -> NodeLauncher:
        return self.launchers[cluster.launcher]

    @staticmethod
    def handle(node: Node) -> NodeHandle:
        return NodeHandle(node.id, node.host or "127.0.0.1", node.port or 0, node.pid, node.launcher_ref or "")

    def event(self, cluster_id: str, kind: str, message: str, **kw: Any) -> None:
        log.info("[%s] %s: %s", cluster_id, kind, message)
        try:
            self.store.add_event(cluster_id, kind, message, **kw)
        except SQLAlchemyError:  # a damaged events table costs the event stream, not the operation
            log.exception("recording the %s event of %s failed; it is only in this log", kind, cluster_id)

    # -------------------------------------------------------------------- init
    def init_cluster(self, *, name: str, topology: str, architecture: str, consensus: str,
                     launcher: str, backend: str, max_nodes: int, auto_healing: bool,
                     wasm_optimization: bool, daa_enabled: bool,
                     extra: dict[str, Any] | None = None) -> r.ClusterInitReply:
        usable, reason = self.launchers[launcher].available()
        if not usable:
            raise ServiceError(f"launcher {launcher!r} cannot start nodes: {reason}. "
                               "Use launcher 'subprocess' (local node processes) or fix the above")
        check_requested(backend, launcher)
        if max_nodes > self.settings.limits.max_nodes_per_cluster:
            raise ServiceError(
                f"max_nodes {max_nodes} is above this server's limit of "
                f"{self.settings.limits.max_nodes_per_cluster} nodes per cluster "
                "(FLOW_NEXUS_MAX_NODES_PER_CLUSTER); ask for fewer"
            )
        with self.store.session() as s:
            active = s.scalar(select(func.count()).select_from(Cluster)
                              .where(Cluster.status != ClusterState.TERMINATED))
        if active and active >= self.settings.limits.max_clusters:
            raise ServiceError(
                f"{active} clusters are active, the limit is {self.settings.limits.max_clusters} "
                "(FLOW_NEXUS_MAX_CLUSTERS)", next_step=NextStep.TERMINATE_CLUSTER)
        cluster_id = "dnc_" + secrets.token_hex(6)
        directory = self.settings.clusters_dir / cluster_id
        directory.mkdir(mode=0o700)
        (directory / "nodes").mkdir(mode=0o700)
        options = {"wasmOptimization": wasm_optimization, "daaEnabled": daa_enabled, **(extra or {}),
                   "backend_requested": backend}
        cluster = Cluster(
            id=cluster_id, name=name, status=ClusterState.INITIALIZING, topology=topology,
            architecture=architecture, consensus=consensus, launcher=launcher,
            backend=backend, max_nodes=max_nodes, auto_healing=auto_healing,
            token=secrets.token_hex(32), directory=str(directory), options=options,
            created_at=time.time(),
        )
        with self.store.session() as s:
            s.add(cluster)
        self.event(cluster_id, "cluster_created", f"cluster {name!r} created ({topology}, {architecture})")
        return r.ClusterInitReply(
            success=True, cluster_id=cluster_id, name=name, status=cluster.status, topology=topology,
            architecture=architecture, consensus=consensus, launcher=launcher, backend=cluster.backend,
            max_nodes=max_nodes, auto_healing=auto_healing, wasm_enabled=wasm_optimization,
            daa_enabled=daa_enabled, directory=str(directory), created_at=cluster.created_at,
            next_step="deploy nodes",  # the tool layer names the tool
        )


    # ------------------------------------------------------------------ status
    def status(self, cluster_id: str) -> r.ClusterStatusReply:
        """The cluster as the controller knows it: the store's records and the nodes' last pushes
        (service.telemetry). No node is called: a slow node cannot slow status down."""
        rows = self.rows(cluster_id)
        cluster, all_nodes = rows.cluster, rows.nodes
        live = [n for n in all_nodes if n.status in LIVE_NODE_STATES]
        topo = cluster.connected_topology or cluster.topology
        formed = cluster.status in FORMED_CLUSTER_STATES
        edge_list = topology_edges(topo, len(live)) if formed else []
        now = time.time()
        node_rows = []
        for node in all_nodes:
            is_live = node.status in LIVE_NODE_STATES
            report = self.telemetry.report(node.id) if is_live else None
            h = report.health if report is not None else None
            node_rows.append(r.NodeStatus(
                node_id=node.id, sandbox_id=Path(node.sandbox).name, role=node.role, status=node.status,
                alive=is_live and self.telemetry.fresh(report, now), pid=node.pid, host=node.host,
                rss_mb=round(h.rss_bytes / 2**20, 1) if h else None,
                rank=node.rank if is_live else None,
                generation=node.generation if is_live else None,
                last_heartbeat=report.seen if report else None,
                heartbeat_age_s=round(now - report.seen, 3) if report else None,
                connections=sum(1 for a, b in edge_list if node.rank in (a, b)) if formed else 0,
                capabilities=node.capabilities, error=node.error,
                metrics={"uptime_s": round(h.uptime_s, 1), "torch_threads": h.torch_threads,
                         "job_state": h.job_state, "cuda_devices": h.cuda_devices,
                         "device": h.group.device if h.group else None} if h else {},
            ))
        net = cluster.options.get("network", {})
        if cluster.status == ClusterState.TERMINATED:
            state, msg = "not_connected", "the cluster is terminated"
        elif formed:
            state, msg = "formed", f"generation {cluster.generation} over {len(live)} node(s), {topo}"
        elif cluster.status == ClusterState.NEEDS_CONNECT:
            state, msg = "needs_connect", cluster.needs_connect_reason or "membership changed"
        else:
            state, msg = "not_connected", "no process group is formed yet"
        return r.ClusterStatusReply(
            success=True, cluster_id=cluster.id, name=cluster.name, status=cluster.status,
            topology=topo, architecture=cluster.architecture, consensus=cluster.consensus,
            launcher=cluster.launcher, backend=cluster.backend, created_at=cluster.created_at,
            uptime_s=round((cluster.terminated_at or now) - cluster.created_at, 1),
            generation=cluster.generation, group_state=state, group_message=msg, nodes=node_rows,
            performance=r.Performance(latency_ms=net.get("avg_latency_ms"),
                                      bandwidth_mbps=net.get("avg_bandwidth_mbps")),
            features=r.Features(
                daa_enabled=bool(cluster.options.get("daaEnabled")),
                wasm_enabled=bool(cluster.options.get("wasmOptimization")),
                nodes_deployed=len(live), connections_active=len(edge_list), training_sessions=rows.sessions,
            ),
            options=cluster.options,
        )


    # -------------------------------------------------------------------- list
    def list_clusters(self, include_terminated: bool = True) -> r.ClusterListReply:
        with self.store.session() as s:
            q = select(Cluster).order_by(Cluster.created_at)
            if not include_terminated:
                q = q.where(Cluster.status != ClusterState.TERMINATED)
            clusters = list(s.scalars(q))
            counts = dict(s.execute(
                select(Node.cluster_id, func.count()).where(Node.status.in_(LIVE_NODE_STATES))
                .group_by(Node.cluster_id)).all())
        rows = [r.ClusterSummary(cluster_id=c.id, name=c.name, status=c.status, topology=c.topology,
                                 architecture=c.architecture, nodes=counts.get(c.id, 0), created_at=c.created_at)
                for c in clusters]
        return r.ClusterListReply(success=True, clusters=rows, count=len(rows))


    # --------------------------------------------------------------- terminate
    def terminate(self, cluster_id: str, reason: str = "terminated on request") -> r.TerminateReply:
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id, active=False)
            if cluster.status == ClusterState.TERMINATED:
                raise Conflict(f"cluster {cluster_id} is already terminated")
            nodes = self.store.nodes(cluster_id)
            results = parallel(lambda n: self._stop_node(cluster, n), nodes)
            out = []
            for node, gone in zip(nodes, results):
                ok = gone is True
                if isinstance(gone, BaseException):
                    log.error("stopping %s failed", node.id, exc_info=gone)
                self.store.update(Node, node.id, status=NodeState.STOPPED if ok else NodeState.LOST,
                                  stopped_at=time.time(), error=None if ok else "could not verify the process stopped")
                self.telemetry.forget(node.id)
                out.append(r.TerminatedNode(node_id=node.id, pid=node.pid, process_gone=ok))
            all_gone = all(n.process_gone for n in out)
            self.store.update(Cluster, cluster_id, status=ClusterState.TERMINATED, terminated_at=time.time())
            self.event(cluster_id, "cluster_terminated", f"{reason}: {len(out)} node(s) stopped")
            msg = (f"all {len(out)} node process(es) stopped and verified gone" if all_gone else
                   "some node processes could not be verified gone: " +
                   ", ".join(f"{n.node_id} (pid {n.pid})" for n in out if not n.process_gone))
            return r.TerminateReply(success=all_gone, cluster_id=cluster_id, status=ClusterState.TERMINATED,
                                    nodes_terminated=sum(n.process_gone for n in out), nodes=out, message=msg)

    def close(self, stop_nodes: bool = True) -> None:
        """Shutdown. ``stop_nodes``: stop every node this store says is live (an in-process server);
        without it nodes run on for the next controller to re-attach (their lease ends them if none
        comes)."""
        if self._closed:
            return
        self._closed = True
        with self.store.session() as s:
            ids = list(s.scalars(select(Cluster.id).where(Cluster.status != ClusterState.TERMINATED)))
        for cluster_id in ids if stop_nodes else []:
            try:
                if self.store.nodes(cluster_id):
                    self.terminate(cluster_id, reason="server shut down")
            except Exception:
                log.exception("stopping cluster %s at shutdown failed", cluster_id)
        self.telemetry.close()  # nodes left running lose their lease unless a controller takes them
        for launcher in self.launchers.values():
            close = getattr(launcher, "close", None)
            if close is not None:
                close()
        self.store.close()
