"""Cluster lifecycle: init, deploy, connect, status, remove, logs, terminate.

Every public method is synchronous and thread-safe (one lock per cluster); the MCP layer runs
them on worker threads so the event loop never blocks on a node or on the store.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from flow_nexus_server import replies as r
from flow_nexus_server.config import Settings
from flow_nexus_server.home import prepare_home
from flow_nexus_server.launchers import LaunchError, NodeHandle, NodeLauncher, NodeSpec
from flow_nexus_server.launchers.base import log_tail
from flow_nexus_server.launchers.docker import DockerLauncher, UnavailableLauncher
from flow_nexus_server.launchers.warm import local_launcher
from flow_nexus_server.launchers.local import NODE_LOG
from flow_nexus_server.service.backend import NodeGpus, check_gpus, check_requested, choose_backend, local_ranks
from flow_nexus_server.service.errors import Conflict, NotFound, ServiceError
from flow_nexus_server.service.node_client import NodeClient, NodeRequestError
from flow_nexus_server.service.telemetry import Directory, Telemetry
from flow_nexus_server.service.rendezvous import store_on_first_node
from flow_nexus_server.service.topology import edges as topology_edges
from flow_nexus_server.store import Cluster, Node, Store, TrainingSession
from flow_nexus_server.store.db import LIVE_NODE_STATES
from workers import protocol as p

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ranks: the roles that coordinate come first, so the aggregator / parameter server is rank 0.
ROLE_RANK_ORDER = {"aggregator": 0, "parameter_server": 1, "validator": 2, "worker": 3}


RESERVED_NAMES = {"agent.json", NODE_LOG}


NAME_MAX = 255  # bytes in one path component (Linux file systems)
PATH_MAX = 4096  # bytes in a whole path, with its terminating NUL


def safe_path(root: Path, name: str) -> Path:
    """``root / name`` when it stays inside ``root`` (no absolute path, no '..', no symlink escape)."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise ServiceError(f"file name {name!r} must be a relative path inside the node's sandbox, e.g. data/mine.csv")
    if any(part == ".." for part in Path(name).parts):
        raise ServiceError(f"file name {name!r} may not contain '..'; give a path inside the node's sandbox")
    check_name_length(root, name)
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ServiceError(f"file name {name[:80]!r} cannot be used ({getattr(exc, 'strerror', None) or exc}); "
                           "choose another name") from exc
    if target != root and root not in target.parents:
        raise ServiceError(f"file name {name!r} leads outside the node's sandbox {root} (through a symlink); "
                           "choose another name")
    if target.name in RESERVED_NAMES or target.is_dir():
        raise ServiceError(f"{name!r} is reserved or a directory in the node's sandbox; choose another file name")
    return target


def check_name_length(root: Path, name: str) -> None:
    """The file system's limits as a sentence, rather than an error from deep inside a write."""
    try:
        parts = [part.encode("utf-8") for part in Path(name).parts]
    except UnicodeEncodeError as exc:
        raise ServiceError(f"file name {name[:80]!r} is not valid Unicode text; choose another name") from exc
    longest = max(parts, key=len)
    if len(longest) > NAME_MAX:
        raise ServiceError(f"file name is too long: {longest[:40].decode('utf-8', 'replace')!r}... is {len(longest)} "
                           f"bytes, the limit is {NAME_MAX} bytes per path component; choose a shorter name")
    whole = len(os.fsencode(root)) + 1 + len(name.encode("utf-8"))
    if whole >= PATH_MAX:
        raise ServiceError(f"file name is too long: the path in the sandbox would be {whole} bytes, the limit is "
                           f"{PATH_MAX - 1} bytes (PATH_MAX); choose a shorter name")


def write_no_follow(root: Path, relative: Path, data: bytes) -> None:
    """Write ``root / relative`` without following a symlink anywhere below ``root``.

    Each directory on the way is opened with O_NOFOLLOW (created 0700 when missing); the data
    goes to a fresh 0600 file under a random name (O_CREAT | O_EXCL | O_NOFOLLOW) and is renamed
    over the name, which replaces a symlink of that name instead of writing through it.
    """
    *dirs, name = relative.parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:  # ELOOP (a symlink) or ENOTDIR (a file)
                raise ServiceError(f"{part!r} in {str(relative)!r} is a symlink or a file, not a directory of the "
                                   "node's sandbox; choose another name") from exc
            os.close(fd)
            fd = sub
        tmp = f".upload-{secrets.token_hex(8)}.part"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=fd)
            except FileNotFoundError:
                pass
            if isinstance(exc, IsADirectoryError):
                raise ServiceError(f"{str(relative)!r} is a directory in the node's sandbox; choose another "
                                   "file name") from exc
            raise
    finally:
        os.close(fd)


def ray_launcher() -> NodeLauncher:
    try:
        from flow_nexus_server.launchers.ray import RayLauncher
    except ImportError:
        return UnavailableLauncher("ray", "Ray is not installed; install it with pip install 'flow-nexus-server[ray]'")
    return RayLauncher()


HOST_MEMORY_RESERVE_MB = 512


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


_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fan-out")


def parallel(fn: Callable[[Any], T], items: Iterable[Any]) -> list[T | BaseException]:
    """Run ``fn`` over items concurrently; each result is the value or the exception raised."""
    items = list(items)

    def safe(item: Any) -> T | BaseException:
        try:
            return fn(item)
        except BaseException as exc:  # returned, so one failure does not hide the others
            return exc

    if len(items) <= 1:
        return [safe(i) for i in items]
    return list(_POOL.map(safe, items))


@dataclass(frozen=True)
class ClusterRows:
    version: int  # Store.version they were read at
    cluster: Cluster
    nodes: list[Node]  # every node, in deploy order
    sessions: int  # training sessions ever started on the cluster


class ClusterService:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        prepare_home(settings)  # before the store: the home is 0700 before the database lands in it
        self.store = store or Store(settings.db_url)
        self.launchers: dict[str, NodeLauncher] = {
            # On Linux, forks node agents from a template that has torch imported: ~0.1 s a node,
            # not ~2 s; elsewhere (or FLOW_NEXUS_SPAWNER=plain) one cold process per node.
            "subprocess": local_launcher(settings.home),
            "docker": DockerLauncher(),
            "ray": ray_launcher(),
        }
        # Nodes push their health and progress here every second; status and the monitor read it.
        self.telemetry = Telemetry(Directory(self._token_of, self._is_live_node), port=settings.telemetry_port)
        # Told once per node the monitor (or anyone) declares lost: (cluster, node, reason).
        self.on_node_lost: list[Callable[[Cluster, Node, str], None]] = []
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
                f"cluster {cluster_id!r} does not exist; call neural_cluster_list to see clusters "
                "or neural_cluster_init to create one"
            )
        if active and cluster.status == "terminated":
            raise Conflict(
                f"cluster {cluster_id} is terminated; create a new one with neural_cluster_init"
            )
        return cluster

    def get_node(self, node_id: str) -> Node:
        node = self.store.node(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} does not exist; neural_cluster_status lists a cluster's nodes")
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

    def _token_of(self, cluster_id: str) -> str | None:
        """The token nodes of this cluster push telemetry with; None when it is unknown or terminated."""
        try:
            cluster = self.rows(cluster_id).cluster
        except NotFound:
            return None
        return cluster.token if cluster.status != "terminated" else None

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
            active = s.scalar(select(func.count()).select_from(Cluster).where(Cluster.status != "terminated"))
        if active and active >= self.settings.limits.max_clusters:
            raise ServiceError(
                f"{active} clusters are active, the limit is {self.settings.limits.max_clusters} "
                "(FLOW_NEXUS_MAX_CLUSTERS); terminate one with neural_cluster_terminate first"
            )
        cluster_id = "dnc_" + secrets.token_hex(6)
        directory = self.settings.clusters_dir / cluster_id
        directory.mkdir(mode=0o700)
        (directory / "nodes").mkdir(mode=0o700)
        options = {"wasmOptimization": wasm_optimization, "daaEnabled": daa_enabled, **(extra or {}),
                   "backend_requested": backend}
        cluster = Cluster(
            id=cluster_id, name=name, status="initializing", topology=topology,
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
            next_step=f"deploy nodes with neural_node_deploy(cluster_id='{cluster_id}')",
        )

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
            live = self.store.nodes(cluster_id)
            if len(live) + count > cluster.max_nodes:
                raise ServiceError(
                    f"cluster {cluster_id} has {len(live)} of at most {cluster.max_nodes} nodes; "
                    f"deploying {count} more would exceed max_nodes. Remove nodes with "
                    "neural_node_remove or create a cluster with a larger max_nodes"
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
                    id=node_id, cluster_id=cluster_id, seq=seq0 + i, role=role, status="starting",
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
            failed = [i for i in infos if i.status == "failed"]
            ok = [i for i in infos if i.status == "deployed"]
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
        node = Node(id=node_id, cluster_id=cluster_id, seq=dead.seq, role=dead.role, status="starting",
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

    def reform(self, cluster_id: str) -> r.ConnectReply:
        """Re-form the group over the live nodes (new generation), whatever the cluster is doing."""
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            nodes = self.store.nodes(cluster_id)
            if not nodes:
                raise ServiceError(f"cluster {cluster_id} has no live node left to form a group")
            return self._form_group(cluster, nodes, cluster.connected_topology or cluster.topology)

    def _start_node(self, cluster: Cluster, node: Node) -> float:
        """Launch one node and wait for its health check; returns the start-up time."""
        start = time.monotonic()
        spec = NodeSpec(node.id, cluster.id, node.role, Path(node.sandbox), cluster.token,
                        num_cpus=node.options.get("num_cpus", 1.0), num_gpus=node.options.get("num_gpus", 0.0),
                        allowed_roots=tuple(self.settings.allowed_roots), controller_url=self.telemetry.url)
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
        self.store.update(Node, node.id, status="running", options=node.options)
        return time.monotonic() - start

    def _node_info(self, node: Node, result: float | BaseException) -> r.NodeInfo:
        if isinstance(result, BaseException):
            error = str(result) if isinstance(result, (LaunchError, NodeRequestError)) else \
                f"{type(result).__name__}: {result}"
            if not isinstance(result, (LaunchError, NodeRequestError)):
                log.error("deploying %s failed", node.id, exc_info=result)
            self.store.update(Node, node.id, status="failed", error=error, stopped_at=time.time())
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

    # ----------------------------------------------------------------- connect
    def connect(self, cluster_id: str, topology: str | None = None) -> r.ConnectReply:
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            nodes = self.store.nodes(cluster_id)
            if not nodes:
                raise ServiceError(
                    f"cluster {cluster_id} has no nodes; call neural_node_deploy first"
                )
            if cluster.status == "training":
                raise Conflict(f"cluster {cluster_id} is training; stop the session before reconnecting")
            return self._form_group(cluster, nodes, topology or cluster.topology)

    def _form_group(self, cluster: Cluster, nodes: list[Node], topology: str) -> r.ConnectReply:
        ordered = sorted(nodes, key=lambda n: (ROLE_RANK_ORDER.get(n.role, 9), n.seq))
        generation = cluster.generation + 1
        host, port = self._store_address(cluster, ordered[0], generation)
        world = len(ordered)
        backend, why = choose_backend(cluster.options.get("backend_requested", "auto"), [
            NodeGpus(n.id, n.host, n.options.get("cuda_devices", 0), n.options.get("cuda_visible")) for n in ordered])
        local = local_ranks([n.host for n in ordered])

        def join(item: tuple[int, Node]) -> p.JoinReply:
            rank, node = item
            req = p.JoinRequest(
                generation=generation, rank=rank, world_size=world, store_host=host, store_port=port,
                store_prefix=f"{cluster.id}/g{generation}", backend=backend, local_rank=local[rank],
                timeout_s=self.settings.group_timeout_s,
            )
            return self.client(cluster, node).join(req)

        joined = parallel(join, enumerate(ordered))
        errors = [f"{n.id}: {res}" for n, res in zip(ordered, joined) if isinstance(res, BaseException)]
        if errors:
            self._mark_needs_connect(cluster, generation, "forming the group failed: " + "; ".join(errors))
            raise ServiceError(
                f"forming generation {generation} of cluster {cluster.id} failed: {'; '.join(errors)}. "
                "Check the node with neural_node_logs, remove it with neural_node_remove, then reconnect"
            )
        edge_list = topology_edges(topology, world)
        probe = p.ProbeRequest(generation=generation, edges=edge_list)
        probed = parallel(lambda n: self.client(cluster, n).probe(probe), ordered)
        errors = [f"{n.id}: {res}" for n, res in zip(ordered, probed) if isinstance(res, BaseException)]
        if errors:
            self._mark_needs_connect(cluster, generation, "measuring links failed: " + "; ".join(errors))
            raise ServiceError(f"measuring the links of cluster {cluster.id} failed: {'; '.join(errors)}")
        measured = {(m.src, m.dst): m for reply in probed for m in reply.edges}  # type: ignore[union-attr]
        out_edges = []
        for a, b in edge_list:
            m = measured.get((a, b))
            if m is None:
                raise ServiceError(f"no measurement came back for edge {a}->{b}; reconnect the cluster")
            out_edges.append(r.Edge(**{"from": a}, to=b, from_node=ordered[a].id, to_node=ordered[b].id,
                                    status="active", latency_ms=round(m.rtt_ms, 4),
                                    bandwidth_mbps=round(m.bandwidth_mbps, 2)))
        lat = [e.latency_ms for e in out_edges]
        bw = [e.bandwidth_mbps for e in out_edges]
        health = r.NetworkHealth(
            avg_latency_ms=statistics.fmean(lat) if lat else None, max_latency_ms=max(lat) if lat else None,
            avg_bandwidth_mbps=statistics.fmean(bw) if bw else None, min_bandwidth_mbps=min(bw) if bw else None,
        )
        with self.store.session() as s:
            for rank, node in enumerate(ordered):
                row = s.get(Node, node.id)
                row.rank, row.generation = rank, generation
            c = s.get(Cluster, cluster.id)
            c.generation, c.connected_topology, c.status = generation, topology, "connected"
            c.needs_connect_reason, c.store_host, c.store_port = None, host, port
            c.backend = backend
            c.options = {**c.options, "network": {**health.model_dump(), "edges": len(out_edges)}}
        cluster.generation, cluster.backend = generation, backend
        self.event(cluster.id, "group_formed",
                   f"generation {generation}: {world} node(s) joined over {backend} ({why}), "
                   f"{topology} with {len(out_edges)} edge(s)",
                   data={"generation": generation, "topology": topology, "backend": backend,
                         "store": f"{host}:{port}", "store_node": ordered[0].id})
        return r.ConnectReply(
            success=True, cluster_id=cluster.id, topology=topology, backend=backend, generation=generation,
            connections=len(out_edges), nodes_connected=world,
            ranks=[r.RankInfo(node_id=n.id, rank=i, role=n.role) for i, n in enumerate(ordered)],
            edges=out_edges, network_health=health,
            join_ms_max=max(j.join_ms for j in joined),  # type: ignore[union-attr]
        )

    def _store_address(self, cluster: Cluster, first: Node, generation: int) -> tuple[str, int]:
        """The rendezvous store's address, hosted by the first node in rank order (which keeps the store
        it has; a new first node starts one): the controller holds no store, so training outlives it."""
        try:
            return store_on_first_node(self.client(cluster, first), first.host, cluster.store_port)
        except NodeRequestError as exc:
            self._mark_needs_connect(cluster, generation, f"the first node could not host the rendezvous store: {exc}")
            raise ServiceError(
                f"forming generation {generation} of cluster {cluster.id} failed: the first node could not host "
                f"the rendezvous store ({exc}). Check it with neural_node_logs, remove it with neural_node_remove, "
                "then reconnect") from exc

    def _mark_needs_connect(self, cluster: Cluster, generation: int, reason: str) -> None:
        with self.store.session() as s:
            c = s.get(Cluster, cluster.id)
            c.generation, c.status, c.needs_connect_reason = generation, "needs_connect", reason
        cluster.generation = generation
        self.event(cluster.id, "group_failed", reason)

    def _after_membership_change(self, cluster_id: str, what: str) -> r.GroupChange:
        """Deploy/remove on a connected cluster re-forms the group; otherwise records the state."""
        cluster = self.get_cluster(cluster_id)
        nodes = self.store.nodes(cluster_id)
        if cluster.status in ("connected",) and nodes:
            try:
                reply = self._form_group(cluster, nodes, cluster.connected_topology or cluster.topology)
            except ServiceError as exc:
                return r.GroupChange(action="needs_connect", generation=cluster.generation,
                                     message=f"{what}; re-forming the group failed ({exc}); call neural_cluster_connect")
            return r.GroupChange(action="reformed", generation=reply.generation,
                                 message=f"{what}; the group was re-formed as generation {reply.generation}")
        if not nodes:
            self.store.update(Cluster, cluster_id, status="initializing", needs_connect_reason=None)
            return r.GroupChange(action="none", generation=cluster.generation, message=f"{what}; no nodes left")
        if cluster.status in ("initializing",):
            self.store.update(Cluster, cluster_id, status="ready")
            return r.GroupChange(action="none", generation=cluster.generation,
                                 message=f"{what}; call neural_cluster_connect to form the process group")
        if cluster.status == "needs_connect":
            return r.GroupChange(action="needs_connect", generation=cluster.generation,
                                 message=f"{what}; call neural_cluster_connect to form the process group")
        return r.GroupChange(action="none", generation=cluster.generation, message=what)

    def collective_benchmark(self, cluster_id: str) -> list[r.CollectiveFigure]:
        """Averaging all-reduce time and bandwidth per topology and message size, across the live group."""
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            if cluster.status != "connected":
                raise ServiceError(f"cluster {cluster_id} is {cluster.status}; connect it (and let training finish) "
                                   "before benchmarking its links")
            nodes = sorted(self.store.nodes(cluster_id), key=lambda n: n.rank if n.rank is not None else 1 << 30)
            req = p.CollectiveBenchRequest(generation=cluster.generation)
            replies = parallel(lambda n: self.client(cluster, n).bench_collectives(req), nodes)
            errors = [f"{n.id}: {e}" for n, e in zip(nodes, replies) if isinstance(e, BaseException)]
            if errors:
                raise ServiceError("the all-reduce benchmark failed on " + "; ".join(errors))
            figures = []
            for i, first in enumerate(replies[0].results):  # type: ignore[union-attr]
                slowest = max(rep.results[i].median_ms for rep in replies)  # type: ignore[union-attr]
                figures.append(r.CollectiveFigure(topology=first.topology, bytes=first.bytes, time_ms=slowest,
                                                  algbw_mbps=first.bytes * 8 / (slowest / 1000) / 1e6,
                                                  world_size=len(nodes)))
            return figures

    # ------------------------------------------------------------------ status
    def status(self, cluster_id: str) -> r.ClusterStatusReply:
        """The cluster as the controller knows it: the store's records and the nodes' last pushes
        (service.telemetry). No node is called: a slow node cannot slow status down."""
        rows = self.rows(cluster_id)
        cluster, all_nodes = rows.cluster, rows.nodes
        live = [n for n in all_nodes if n.status in LIVE_NODE_STATES]
        topo = cluster.connected_topology or cluster.topology
        formed = cluster.status in ("connected", "training")
        edge_list = topology_edges(topo, len(live)) if formed else []
        now = time.time()
        node_rows = []
        for node in all_nodes:
            is_live = node.status in LIVE_NODE_STATES
            report = self.telemetry.report(node.id) if is_live else None
            h = report.health if report is not None else None
            node_rows.append(r.NodeStatus(
                node_id=node.id, sandbox_id=Path(node.sandbox).name, role=node.role, status=node.status,
                alive=is_live and self.telemetry.fresh(report, now), pid=node.pid,
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
        if cluster.status == "terminated":
            state, msg = "not_connected", "the cluster is terminated"
        elif formed:
            state, msg = "formed", f"generation {cluster.generation} over {len(live)} node(s), {topo}"
        elif cluster.status == "needs_connect":
            state, msg = "needs_connect", (cluster.needs_connect_reason or "membership changed") + \
                "; call neural_cluster_connect"
        else:
            state, msg = "not_connected", "call neural_cluster_connect to form the process group"
        return r.ClusterStatusReply(
            success=True, cluster_id=cluster.id, name=cluster.name, status=cluster.status,
            topology=topo, architecture=cluster.architecture, consensus=cluster.consensus,
            launcher=cluster.launcher, backend=cluster.backend, created_at=cluster.created_at,
            uptime_s=round((cluster.terminated_at or now) - cluster.created_at, 1),
            generation=cluster.generation, group_state=state, group_message=msg, nodes=node_rows,
            performance=r.Performance(latency_ms=net.get("avg_latency_ms"), bandwidth_mbps=net.get("avg_bandwidth_mbps")),
            features=r.Features(
                daa_enabled=bool(cluster.options.get("daaEnabled")),
                wasm_enabled=bool(cluster.options.get("wasmOptimization")),
                nodes_deployed=len(live), connections_active=len(edge_list), training_sessions=rows.sessions,
            ),
            options=cluster.options,
        )

    def node_lost(self, cluster: Cluster, node: Node, reason: str) -> None:
        """Record a node that died or went silent, once: one node_failed event, then the
        ``on_node_lost`` listeners (a running session fails, heals or hands over raft)."""
        with self.lock(cluster.id):
            current = self.store.node(node.id)
            if current is None or current.status not in LIVE_NODE_STATES:
                return
            self.store.update(Node, node.id, status="failed", error=reason, stopped_at=time.time())
            self.telemetry.forget(node.id)
            self.event(cluster.id, "node_failed", f"node {node.id} ({node.role}) failed: {reason}", node_id=node.id)
            c = self.get_cluster(cluster.id, active=False)
            if c.status in ("connected", "training"):
                self.store.update(Cluster, cluster.id, status="needs_connect",
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
            clusters = list(s.scalars(select(Cluster).where(Cluster.status != "terminated")))
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
                    self.store.update(Node, node.id, status="lost", stopped_at=time.time(),
                                      error="not found alive when the server restarted")
            lost = len(nodes) - len(alive)
            if lost and cluster.status in ("connected", "training"):
                self.store.update(Cluster, cluster.id, status="needs_connect",
                                  needs_connect_reason=f"{lost} node(s) lost while the server was down")
            self.event(cluster.id, "server_reattached",
                       f"server restarted: {len(alive)} node(s) re-attached, {lost} lost")

    # -------------------------------------------------------------------- list
    def list_clusters(self, include_terminated: bool = True) -> r.ClusterListReply:
        with self.store.session() as s:
            q = select(Cluster).order_by(Cluster.created_at)
            if not include_terminated:
                q = q.where(Cluster.status != "terminated")
            clusters = list(s.scalars(q))
            counts = dict(s.execute(
                select(Node.cluster_id, func.count()).where(Node.status.in_(LIVE_NODE_STATES))
                .group_by(Node.cluster_id)).all())
        rows = [r.ClusterSummary(cluster_id=c.id, name=c.name, status=c.status, topology=c.topology,
                                 architecture=c.architecture, nodes=counts.get(c.id, 0), created_at=c.created_at)
                for c in clusters]
        return r.ClusterListReply(success=True, clusters=rows, count=len(rows))

    # ------------------------------------------------------------------ remove
    def remove_node(self, node_id: str) -> r.NodeRemoveReply:
        node = self.get_node(node_id)
        with self.lock(node.cluster_id):
            cluster = self.get_cluster(node.cluster_id)
            node = self.get_node(node_id)
            if cluster.status == "training":
                raise Conflict(f"cluster {cluster.id} is training; stop the session before removing nodes")
            if node.status not in LIVE_NODE_STATES:
                raise Conflict(f"node {node_id} is already {node.status}; nothing to remove")
            gone = self._stop_node(cluster, node)
            if not gone:
                raise ServiceError(f"node {node_id} (pid {node.pid}) could not be stopped; it is still running")
            self.store.update(Node, node_id, status="removed", stopped_at=time.time(), rank=None)
            self.telemetry.forget(node_id)
            self.event(cluster.id, "node_removed", f"node {node_id} removed", node_id=node_id)
            group = self._after_membership_change(cluster.id, f"node {node_id} removed")
            return r.NodeRemoveReply(success=True, cluster_id=cluster.id, node_id=node_id, pid=node.pid,
                                     process_gone=True, cluster_status=self.get_cluster(cluster.id).status,
                                     group=group)

    def _stop_node(self, cluster: Cluster, node: Node) -> bool:
        """Ask the node to shut down, then make sure: SIGTERM, SIGKILL. True once it is gone."""
        launcher = self.launcher(cluster)
        if node.host and node.port and launcher.is_alive(self.handle(node))[0]:
            try:
                self.client(cluster, node).shutdown()
            except NodeRequestError as exc:
                log.info("graceful shutdown of %s failed (%s); signalling it", node.id, exc)
        return launcher.terminate(self.handle(node), grace_s=5)

    # ------------------------------------------------------------------ upload
    def upload(self, node_id: str, file_name: str, content: str, encoding: str) -> r.UploadReply:
        node = self.get_node(node_id)
        self.get_cluster(node.cluster_id)
        if node.status not in LIVE_NODE_STATES:
            raise Conflict(f"node {node_id} is {node.status}; upload to a running node")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ServiceError(f"content is not valid base64 ({exc}); send text with encoding='text'") from exc
        else:
            data = content.encode("utf-8")
        if len(data) > self.settings.limits.max_upload_bytes:
            raise ServiceError(f"the file is {len(data)} bytes, the upload limit is {self.settings.limits.max_upload_bytes} "
                               "bytes per file (FLOW_NEXUS_MAX_UPLOAD_BYTES)")
        sandbox = Path(node.sandbox).resolve()
        safe_path(sandbox, file_name)  # a clear sentence for the common mistakes; write_no_follow enforces
        relative = Path(file_name)  # no '..', no absolute path: checked above
        target = sandbox / relative
        used = sum(f.stat().st_size for f in sandbox.rglob("*") if f.is_file())
        limit = self.settings.limits.max_sandbox_bytes
        if used + len(data) > limit:
            raise ServiceError(f"node {node_id}'s sandbox holds {used} bytes; {len(data)} more would pass its limit of "
                               f"{limit} bytes (FLOW_NEXUS_MAX_SANDBOX_BYTES)")
        write_no_follow(sandbox, relative, data)
        rel = str(relative)
        self.event(node.cluster_id, "file_uploaded", f"{len(data)} bytes written to {node_id}:{rel}", node_id=node_id)
        return r.UploadReply(success=True, node_id=node_id, path=str(target), relative_path=rel, bytes=len(data))

    # -------------------------------------------------------------------- logs
    def node_logs(self, node_id: str, tail: int) -> r.NodeLogsReply:
        node = self.get_node(node_id)
        path = Path(node.sandbox) / NODE_LOG
        text = log_tail(path, tail)
        return r.NodeLogsReply(success=True, node_id=node_id, status=node.status, log_path=str(path),
                               lines=len(text.splitlines()), log=text)

    # --------------------------------------------------------------- terminate
    def terminate(self, cluster_id: str, reason: str = "terminated on request") -> r.TerminateReply:
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id, active=False)
            if cluster.status == "terminated":
                raise Conflict(f"cluster {cluster_id} is already terminated")
            nodes = self.store.nodes(cluster_id)
            results = parallel(lambda n: self._stop_node(cluster, n), nodes)
            out = []
            for node, gone in zip(nodes, results):
                ok = gone is True
                if isinstance(gone, BaseException):
                    log.error("stopping %s failed", node.id, exc_info=gone)
                self.store.update(Node, node.id, status="stopped" if ok else "lost", stopped_at=time.time(),
                                  error=None if ok else "could not verify the process stopped")
                self.telemetry.forget(node.id)
                out.append(r.TerminatedNode(node_id=node.id, pid=node.pid, process_gone=ok))
            all_gone = all(n.process_gone for n in out)
            self.store.update(Cluster, cluster_id, status="terminated", terminated_at=time.time())
            self.event(cluster_id, "cluster_terminated", f"{reason}: {len(out)} node(s) stopped")
            msg = (f"all {len(out)} node process(es) stopped and verified gone" if all_gone else
                   "some node processes could not be verified gone: " +
                   ", ".join(f"{n.node_id} (pid {n.pid})" for n in out if not n.process_gone))
            return r.TerminateReply(success=all_gone, cluster_id=cluster_id, status="terminated",
                                    nodes_terminated=sum(n.process_gone for n in out), nodes=out, message=msg)

    def close(self, stop_nodes: bool = True) -> None:
        """Shutdown. ``stop_nodes``: stop every node this store says is live (an in-process server);
        without it nodes run on for the next controller to re-attach (their lease ends them if none
        comes)."""
        if self._closed:
            return
        self._closed = True
        with self.store.session() as s:
            ids = list(s.scalars(select(Cluster.id).where(Cluster.status != "terminated")))
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
