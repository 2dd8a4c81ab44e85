"""Node registry: launches nodes (deploy, replace), stops and removes them, records a lost one
(once, for the one monitor loop in ``service.monitor``), and re-attaches live ones after a
controller restart.

A mixin of ``ClusterService`` (``service.clusters``): it uses the service's store, launchers,
node clients, locks, events and group manager.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import func, select

from flow_nexus_server import replies as r
from flow_nexus_server.config import Settings
from flow_nexus_server.launchers import LaunchError, NodeLauncher, NodeSpec
from flow_nexus_server.launchers.docker import UnavailableLauncher
from flow_nexus_server.service.backend import check_gpus
from flow_nexus_server.service.budget import check_layer_list_memory
from flow_nexus_server.service.errors import Conflict, NextStep, ServiceError
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.states import FORMED_CLUSTER_STATES, LIVE_NODE_STATES, ClusterState, NodeState
from flow_nexus_server.store import Cluster, Node
from workers import protocol as p

log = logging.getLogger(__name__)

HOST_MEMORY_RESERVE_MB = 512


def ray_launcher(settings: Settings) -> NodeLauncher:
    try:
        from flow_nexus_server.launchers.ray import RayLauncher
    except ImportError:
        return UnavailableLauncher("ray", "Ray is not installed; install it with pip install 'flow-nexus-server[ray]'")
    return RayLauncher(settings.ray_address, settings.ray_strategy, node_ports=settings.ray_node_ports,
                       ship_workers=settings.ray_ship_workers, advertise_host=settings.advertise_host)


def available_memory_mb() -> float | None:
    """Memory the host can give new processes without swapping, in MB (None where it cannot be read)."""
    try:
        return psutil.virtual_memory().available / 2**20
    except (OSError, RuntimeError):
        return None


def check_memory(count: int, per_node_mb: int) -> None:
    """Refuse a deploy the host cannot hold, with the numbers."""
    available = available_memory_mb()
    if available is None:
        return
    need = count * per_node_mb
    if need > available - HOST_MEMORY_RESERVE_MB:
        raise ServiceError(
            f"deploying {count} node(s) needs {count} x {per_node_mb} MB = {need} MB, but the host has "
            f"{available:.0f} MB available and keeps {HOST_MEMORY_RESERVE_MB} MB in reserve; deploy fewer nodes "
            "or ask for less memory_mb"
        )


class NodeRegistry:
    # ------------------------------------------------------------------ deploy
    def deploy_nodes(self, cluster_id: str, *, role: str, count: int, model: str,
                     capabilities: list[str], autonomy: float, template: str,
                     layers: list[dict[str, Any]] | None,
                     options: dict[str, Any] | None = None, memory_mb: int | None = None,
                     num_cpus: float = 1.0, num_gpus: float = 0.0) -> r.DeployReply:
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            check_gpus(num_gpus, cluster.launcher)
            check_memory(count, memory_mb or self.settings.limits.node_memory_mb)
            check_layer_list_memory(layers, memory_mb or self.settings.limits.node_memory_mb)
            live = self.store.nodes(cluster_id)
            if len(live) + count > cluster.max_nodes:
                raise ServiceError(
                    f"cluster {cluster_id} has {len(live)} of at most {cluster.max_nodes} nodes; "
                    f"deploying {count} more would exceed max_nodes", next_step=NextStep.REMOVE_NODES,
                )
            total = self._live_node_count()
            if total + count > self.settings.limits.max_node_processes:
                raise ServiceError(
                    f"{total} node processes run on this host, the limit is "
                    f"{self.settings.limits.max_node_processes} (FLOW_NEXUS_MAX_NODE_PROCESSES); "
                    "terminate a cluster first"
                )
            with self.store.session() as s:
                seq0 = s.scalar(select(func.coalesce(func.max(Node.seq), -1)).where(Node.cluster_id == cluster_id)) + 1
            nodes = []
            for i in range(count):
                node_id = "node_" + secrets.token_hex(4)
                sandbox = Path(cluster.directory) / "nodes" / node_id
                nodes.append(Node(
                    id=node_id, cluster_id=cluster_id, seq=seq0 + i, role=role, status=NodeState.STARTING,
                    model=model, capabilities=capabilities, layers=layers,
                    options={"autonomy": autonomy, "template": template, "num_cpus": num_cpus,
                             "num_gpus": num_gpus, "memory_mb": memory_mb or self.settings.limits.node_memory_mb,
                             **(options or {})},
                    sandbox=str(sandbox), created_at=time.time(),
                ))
            with self.store.session() as s:
                s.add_all(nodes)
            results = parallel(lambda n: self._start_node(cluster, n), nodes)
            infos = [self._node_info(n, res) for n, res in zip(nodes, results)]
            failed = [i for i, res in zip(infos, results) if isinstance(res, BaseException)]
            ok = [i for i, res in zip(infos, results) if not isinstance(res, BaseException)]
            group = self._after_membership_change(cluster_id, f"{len(ok)} node(s) deployed") if ok else \
                r.GroupChange(action="none", generation=cluster.generation, message="no node joined")
            cluster = self.get_cluster(cluster_id)
            if failed:
                detail = "; ".join(f"{i.node_id}: {i.error}" for i in failed)
                kept = f" Nodes started: {', '.join(i.node_id for i in ok)}." if ok else ""
                raise ServiceError(f"{len(failed)} of {count} node(s) failed to deploy: {detail}.{kept}")
            first = infos[0]
            return r.DeployReply(
                success=True, cluster_id=cluster_id, node_id=first.node_id, sandbox_id=first.sandbox_id,
                role=role, status=first.status, capabilities=capabilities, nodes=infos,
                cluster_status=cluster.status, group=group,
            )

    def replace_node(self, cluster_id: str, dead: Node) -> Node:
        """Start a node that takes a lost node's place: same role, options and position (so same shard)."""
        cluster = self.get_cluster(cluster_id)
        node_id = "node_" + secrets.token_hex(4)
        node = Node(id=node_id, cluster_id=cluster_id, seq=dead.seq, role=dead.role, status=NodeState.STARTING,
                    model=dead.model, capabilities=dead.capabilities, layers=dead.layers,
                    options={**dead.options, "replaces": dead.id},
                    sandbox=str(Path(cluster.directory) / "nodes" / node_id), created_at=time.time())
        with self.store.session() as s:
            s.add(node)
        try:
            startup = self._start_node(cluster, node)
        except Exception as exc:
            self._node_info(node, exc)
            raise ServiceError(f"the replacement for {dead.id} failed to start: {exc}") from exc
        self._node_info(node, startup)
        self.event(cluster_id, "node_replaced", f"node {node_id} replaces {dead.id} ({dead.role})", node_id=node_id)
        return self.get_node(node_id)

    def _start_node(self, cluster: Cluster, node: Node) -> float:
        """Launch one node and wait for its health check; returns the start-up time."""
        start = time.monotonic()
        spec = NodeSpec(node.id, cluster.id, node.role, Path(node.sandbox), cluster.token,
                        num_cpus=node.options.get("num_cpus", 1.0), num_gpus=node.options.get("num_gpus", 0.0),
                        allowed_roots=tuple(self.settings.allowed_roots), controller_url=self.telemetry.url,
                        cpu_nice=self.settings.node_nice)
        handle = self.launcher(cluster).launch(spec, self.settings.node_start_timeout_s)
        self.store.update(Node, node.id, host=handle.host, port=handle.port, pid=handle.pid,
                          launcher_ref=handle.ref)
        node.host, node.port, node.pid = handle.host, handle.port, handle.pid
        try:
            health = self.client(cluster, node).health(timeout=10)
        except NodeRequestError as exc:
            self.launcher(cluster).terminate(handle, grace_s=1)
            raise LaunchError(f"it started but failed its health check: {exc}") from exc
        if health.node_id != node.id:
            self.launcher(cluster).terminate(handle, grace_s=1)
            raise LaunchError(f"the process on port {handle.port} answered as {health.node_id}")
        self.telemetry.record(cluster.id, health)  # its first heartbeat; pushes follow every second
        # What GPUs a process sees is fixed for its life: kept for the backend choice at connect.
        node.options = {**node.options, "cuda_devices": health.cuda_devices, "cuda_visible": health.cuda_visible}
        self.store.update(Node, node.id, status=NodeState.RUNNING, options=node.options)
        return time.monotonic() - start

    def _node_info(self, node: Node, result: float | BaseException) -> r.NodeInfo:
        if isinstance(result, BaseException):
            error = str(result) if isinstance(result, (LaunchError, NodeRequestError)) else \
                f"{type(result).__name__}: {result}"
            if not isinstance(result, (LaunchError, NodeRequestError)):
                log.error("deploying %s failed", node.id, exc_info=result)
            self.store.update(Node, node.id, status=NodeState.FAILED, error=error, stopped_at=time.time())
            self.event(node.cluster_id, "node_failed", f"node {node.id} failed to deploy: {error}", node_id=node.id)
            status, startup, err = "failed", None, error
        else:
            self.event(node.cluster_id, "node_deployed", f"node {node.id} ({node.role}) is up, pid {node.pid}",
                       node_id=node.id, data={"startup_s": result})
            status, startup, err = "deployed", result, None
        return r.NodeInfo(
            node_id=node.id, sandbox_id=Path(node.sandbox).name, sandbox_path=node.sandbox, role=node.role,
            status=status, capabilities=node.capabilities, model=node.model,
            autonomy=node.options.get("autonomy", 0.8), pid=node.pid, startup_s=startup, error=err,
        )

    def _live_node_count(self) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(Node).where(Node.status.in_(LIVE_NODE_STATES))) or 0

    # ------------------------------------------------------------------ remove
    def remove_node(self, node_id: str) -> r.NodeRemoveReply:
        node = self.get_node(node_id)
        with self.lock(node.cluster_id):
            cluster = self.get_cluster(node.cluster_id)
            node = self.get_node(node_id)
            if node.status not in LIVE_NODE_STATES:
                raise Conflict(f"node {node_id} is already {node.status}; nothing to remove")
            if cluster.status == ClusterState.TRAINING:
                # Elastic scale-in: the running session lets the node go at its next boundary (or refuses).
                if not any(listener(cluster.id, node) for listener in self.on_training_leave):
                    raise Conflict(f"cluster {cluster.id} is training; stop the session before removing nodes")
                self.event(cluster.id, "node_leaving", f"node {node_id} ({node.role}) leaves the running session "
                           "at its next epoch / round boundary and is stopped there", node_id=node_id)
                return r.NodeRemoveReply(
                    success=True, cluster_id=cluster.id, node_id=node_id, pid=node.pid, process_gone=False,
                    cluster_status=cluster.status, group=r.GroupChange(
                        action="at_next_boundary", generation=cluster.generation,
                        message=f"node {node_id} removed from the running session: the group re-forms without it at "
                                "the session's next epoch / round boundary (the data is re-sharded among the rest, "
                                "the model carries over) and its process is stopped there"))
            self._retire(cluster, node)
            group = self._after_membership_change(cluster.id, f"node {node_id} removed")
            return r.NodeRemoveReply(success=True, cluster_id=cluster.id, node_id=node_id, pid=node.pid,
                                     process_gone=True, cluster_status=self.get_cluster(cluster.id).status,
                                     group=group)

    def retire_node(self, cluster_id: str, node_id: str) -> None:
        """Stop a node a running session let go at its boundary (the caller re-forms the group)."""
        with self.lock(cluster_id):
            node = self.get_node(node_id)
            if node.status in LIVE_NODE_STATES:
                self._retire(self.get_cluster(cluster_id, active=False), node)

    def _retire(self, cluster: Cluster, node: Node) -> None:
        """Stop ``node`` for good and record it removed."""
        if not self._stop_node(cluster, node):
            raise ServiceError(f"node {node.id} (pid {node.pid}) could not be stopped; it is still running")
        self.store.update(Node, node.id, status=NodeState.REMOVED, stopped_at=time.time(), rank=None)
        self.telemetry.forget(node.id)
        self.event(cluster.id, "node_removed", f"node {node.id} removed", node_id=node.id)

    def _stop_node(self, cluster: Cluster, node: Node) -> bool:
        """Ask the node to shut down, then make sure: SIGTERM, SIGKILL. True once it is gone."""
        launcher = self.launcher(cluster)
        if node.host and node.port and launcher.is_alive(self.handle(node))[0]:
            try:
                self.client(cluster, node).shutdown()
            except NodeRequestError as exc:
                log.info("graceful shutdown of %s failed (%s); signalling it", node.id, exc)
        return launcher.terminate(self.handle(node), grace_s=5)

    def node_lost(self, cluster: Cluster, node: Node, reason: str) -> None:
        """Record a node that died or went silent, once: one node_failed event, then the
        ``on_node_lost`` listeners (a running session fails, heals or hands over raft)."""
        with self.lock(cluster.id):
            current = self.store.node(node.id)
            if current is None or current.status not in LIVE_NODE_STATES:
                return
            self.store.update(Node, node.id, status=NodeState.FAILED, error=reason, stopped_at=time.time())
            self.telemetry.forget(node.id)
            self.event(cluster.id, "node_failed", f"node {node.id} ({node.role}) failed: {reason}", node_id=node.id)
            c = self.get_cluster(cluster.id, active=False)
            if c.status in FORMED_CLUSTER_STATES:
                self.store.update(Cluster, cluster.id, status=ClusterState.NEEDS_CONNECT,
                                  needs_connect_reason=f"node {node.id} failed ({reason})")
        for listener in self.on_node_lost:
            try:
                listener(cluster, current, reason)
            except Exception:
                log.exception("a listener of lost node %s failed", node.id)

    # ----------------------------------------------------------------- recover
    def recover(self) -> None:
        """After a server restart: re-attach to nodes still alive, mark the others lost. Nothing of the
        rendezvous is restarted: the first node still hosts the store, and a re-form asks it again."""
        with self.store.session() as s:
            clusters = list(s.scalars(select(Cluster).where(Cluster.status != ClusterState.TERMINATED)))
        for cluster in clusters:
            nodes = self.store.nodes(cluster.id)
            if not nodes:
                continue
            alive = []
            for node in nodes:
                ok = self.launcher(cluster).is_alive(self.handle(node))[0] and node.port is not None
                if ok:
                    try:  # the node pushes its telemetry here from now on (and its lease is on us)
                        lease = p.LeaseRequest(controller_url=self.telemetry.url)
                        self.telemetry.record(cluster.id, self.client(cluster, node).lease(lease))
                    except NodeRequestError:
                        ok = False
                if ok:
                    alive.append(node)
                else:
                    self.store.update(Node, node.id, status=NodeState.LOST, stopped_at=time.time(),
                                      error="not found alive when the server restarted")
            lost = len(nodes) - len(alive)
            if lost and cluster.status in FORMED_CLUSTER_STATES:
                self.store.update(Cluster, cluster.id, status=ClusterState.NEEDS_CONNECT,
                                  needs_connect_reason=f"{lost} node(s) lost while the server was down")
            self.event(cluster.id, "server_reattached",
                       f"server restarted: {len(alive)} node(s) re-attached, {lost} lost")
