"""Ray launcher: every node is a detached Ray actor that runs the node agent in a thread.

The actor (``NodeActor``) runs the same program as a local node: ``workers.agent.serve`` in a
background thread of the actor's own worker process, with its control API bound to
``127.0.0.1`` when the actor shares the server's host and to the actor host's address
(``ray.util.get_node_ip_address()``) otherwise. The cluster token reaches the actor as an
argument of its ``start`` call and is put into ``os.environ`` inside the actor process only,
where ``serve`` reads and removes it at once; it never appears on a command line and is not
part of the actor's creation arguments or runtime environment (which Ray keeps in its GCS).

Placement: one placement group per node, with one bundle ``{"CPU": num_cpus, "GPU": num_gpus}``
(zero entries left out) taken from the ``NodeSpec``. Nodes are deployed one launch call at a
time and removed one by one, and a placement group cannot grow or shrink, so a group per
cluster does not fit. The cluster-level strategy (constructor or ``FLOW_NEXUS_RAY_STRATEGY``,
default PACK) is applied across a cluster's per-node groups:

- PACK: the group of a cluster's next node asks Ray for the Ray node that already holds most of
  the cluster's nodes (``_soft_target_node_id``, a soft hint: Ray places it elsewhere when that
  node is full or gone).
- SPREAD: the group is restricted to Ray nodes that hold none of the cluster's nodes yet
  (``bundle_label_selector`` on ``ray.io/node-id``), as long as such a node is alive and large
  enough; if it cannot be placed there within a few seconds it is placed anywhere.

Actors are named ``fnx-<node_id>`` in the namespace ``flow-nexus`` with ``lifetime="detached"``
(their placement groups are detached too), so a restarted server finds them again by name.
They survive a server restart only when the Ray cluster itself outlives the server: a local
instance that ``ray.init()`` started inside the server stops with it.

Ray is connected lazily, on first use: ``ray.init(address=...)`` with the address from the
constructor or ``FLOW_NEXUS_RAY_ADDRESS``; without one, ``ray.init`` joins the Ray instance
already running on this machine (``ray start``) or starts a local one. Nothing of Ray reaches
the server's stdout (the MCP stream): ``log_to_driver=False`` keeps worker output in Ray's log
files, ``configure_logging=False`` leaves Ray's own log records to the server's stderr logging,
and the processes Ray starts write to files under its session directory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow_nexus_server.launchers.base import LaunchError, NodeHandle, NodeSpec, log_tail

log = logging.getLogger(__name__)

NAMESPACE = "flow-nexus"
ADDRESS_ENV = "FLOW_NEXUS_RAY_ADDRESS"
STRATEGY_ENV = "FLOW_NEXUS_RAY_STRATEGY"
NODE_PORTS_ENV = "FLOW_NEXUS_RAY_NODE_PORTS"
ADVERTISE_ENV = "FLOW_NEXUS_ADVERTISE_HOST"
STRATEGIES = ("PACK", "SPREAD")
INSTALL_HINT = "pip install 'flow-nexus-server[ray]'"
NODE_ID_LABEL = "ray.io/node-id"
LOOPBACK = "127.0.0.1"
NODE_LOG_NAME = "node.log"
INIT_TIMEOUT_S = 90.0  # ray.init: starting a local instance takes ~10 s here
CONNECT_TIMEOUT_S = 5.0  # the TCP check of a cluster address before ray.init
RETRY_AFTER_S = 10.0  # a failed connection is not retried sooner
SPREAD_WAIT_S = 5.0  # how long a SPREAD group waits for a Ray node the cluster does not use yet


def actor_name(node_id: str) -> str:
    return f"fnx-{node_id}"


def parse_ports(text: str) -> list[int]:
    """``"30000-30099"`` or ``"30000,30001"`` (or a mix) -> the ports; ``""`` -> []."""
    ports: list[int] = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        lo, sep, hi = part.partition("-")
        first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        if not (1 <= first <= last <= 65535):
            raise ValueError(f"bad port range {part!r}")
        ports.extend(range(first, last + 1))
    return ports


# --------------------------------------------------------------------------------- the actor
# Everything from here to RayLauncher runs inside the actor's process. This module is pickled
# by value (see _actor_class), so a Ray node needs the `workers` package and its dependencies,
# not flow_nexus_server: keep this part free of references to flow_nexus_server.


class _SignalShim:
    """Stands in for the ``signal`` module inside ``workers.agent`` in the actor process.

    ``serve`` installs a SIGTERM handler, which Python allows only on the main thread; here
    ``serve`` runs on a background thread, so the handler is kept instead and ``NodeActor.stop``
    calls it, which stops the agent exactly as SIGTERM stops a local node.
    """

    SIGTERM = signal.SIGTERM

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def signal(self, signum: int, handler: Any) -> None:
        self.handlers[signum] = handler


def _serve(agent_module: Any, args: Any, outcome: dict[str, Any]) -> None:
    try:
        outcome["code"] = agent_module.serve(args)
    except BaseException as exc:  # reported to start() through `outcome`
        outcome["error"] = exc
        logging.getLogger("workers.ray_actor").exception("the node agent failed")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _log_to_sandbox(path: Path) -> None:
    """The node's log records (loggers under ``workers``) also go to ``<sandbox>/node.log``."""
    logger = logging.getLogger("workers")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


class NodeActor:
    """One node: runs ``workers.agent.serve`` in a background thread of this actor's process."""

    def __init__(self, node_id: str, cluster_id: str) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}
        self._signals: _SignalShim | None = None
        self._started: dict[str, Any] | None = None

    def ping(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": self.node_id, "cluster_id": self.cluster_id, "ray_node_id": ctx.get_node_id(),
                "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
                "placement_group": ray.util.get_current_placement_group(),
                "agent_running": self._thread is not None and self._thread.is_alive(), **(self._started or {})}

    def start(self, role: str, sandbox: str, threads: int, token: str, server_ip: str | None,
              ports: list[int], timeout_s: float, allowed_roots: tuple[str, ...] = (),
              controller_url: str | None = None) -> dict[str, Any]:
        """Start the agent; returns once it listens: host, port, pid and where it runs.
        ``allowed_roots``: directories outside the sandbox whose files clients may name;
        ``controller_url``: where the node pushes telemetry and holds its lease."""
        import json

        import ray

        import workers.agent as agent
        from workers.protocol import READY_FILE, TOKEN_ENV

        if self._started is not None:
            return self._started
        ctx = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        host = LOOPBACK if server_ip in (None, node_ip) else node_ip
        box = Path(sandbox)
        box.mkdir(parents=True, exist_ok=True)
        os.chdir(box)  # as for a local node: the sandbox is the working directory
        _log_to_sandbox(box / NODE_LOG_NAME)
        self._signals = _SignalShim()
        agent.signal = self._signals  # this process runs nothing but this node
        ready = box / READY_FILE
        deadline = time.monotonic() + timeout_s
        busy: list[int] = []
        for port in ports or [0]:
            if port and not _port_free(host, port):
                busy.append(port)
                continue
            ready.unlink(missing_ok=True)
            args = agent.parse_args([
                "--node-id", self.node_id, "--cluster-id", self.cluster_id, "--role", role,
                "--sandbox", str(box), "--threads", str(threads), "--host", host, "--port", str(port),
                *[arg for root in allowed_roots for arg in ("--allowed-root", root)],
                *(["--controller-url", controller_url] if controller_url else [])])
            outcome: dict[str, Any] = {}
            os.environ[TOKEN_ENV] = token  # this actor's process only; serve() reads and removes it
            thread = threading.Thread(target=_serve, args=(agent, args, outcome), name="node-agent", daemon=True)
            thread.start()
            while time.monotonic() < deadline and thread.is_alive() and not ready.exists():
                time.sleep(0.05)
            os.environ.pop(TOKEN_ENV, None)
            if ready.exists():
                self._thread, self._outcome = thread, outcome
                self._started = {
                    "host": host, "port": int(json.loads(ready.read_text())["port"]), "pid": os.getpid(),
                    "actor_id": ctx.get_actor_id(), "ray_node_id": ctx.get_node_id(), "node_ip": node_ip,
                    "server_package_loaded": "flow_nexus_server" in sys.modules,
                }
                return self._started
            if thread.is_alive():
                raise RuntimeError(f"the node agent did not start listening within {timeout_s:.0f} s")
            error = outcome.get("error")
            if isinstance(error, OSError) and port:  # taken meanwhile: try the next port
                busy.append(port)
                continue
            why = repr(error) if error else f"exit code {outcome.get('code')}"
            raise RuntimeError(f"the node agent stopped during start-up: {why}")
        raise RuntimeError(f"no free port for the control API on {node_ip} among {NODE_PORTS_ENV} "
                           f"({len(busy)} port(s) in use); widen the range")

    def stop(self, grace_s: float) -> bool:
        """Stop the agent as SIGTERM stops a local node; True once its thread has finished."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        handler = self._signals.handlers.get(signal.SIGTERM) if self._signals else None
        if handler is not None:
            handler(signal.SIGTERM, None)
        thread.join(grace_s)
        return not thread.is_alive()


_actor_class: Any = None
_actor_class_lock = threading.Lock()


def _remote_actor_class() -> Any:
    """``ray.remote(NodeActor)``, made once; this module is pickled by value so that Ray nodes
    need only the ``workers`` package, not ``flow_nexus_server``."""
    global _actor_class
    with _actor_class_lock:
        if _actor_class is None:
            import ray
            import ray.cloudpickle

            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
            _actor_class = ray.remote(NodeActor)
        return _actor_class


# ------------------------------------------------------------------------------- the launcher


@dataclass
class _Entry:
    cluster_id: str
    pg: Any = None
    actor: Any = None
    ray_node_id: str | None = None


class RayLauncher:
    name = "ray"

    def __init__(self, address: str | None = None, strategy: str | None = None, *,
                 node_ports: str = "", ship_workers: bool = False, advertise_host: str = "",
                 ping_timeout_s: float = 2.0) -> None:
        # ClusterService passes the values of Settings; the *_ENV names above are for messages.
        self.address = address or None
        self.strategy = (strategy or "PACK").strip().upper()
        self.ping_timeout_s = ping_timeout_s
        self.ship_workers = ship_workers
        self.advertise_host = advertise_host
        self._config_error = ""
        if self.strategy not in STRATEGIES:
            self._config_error = (f"placement strategy {self.strategy!r} ({STRATEGY_ENV}) is not one of "
                                  f"{', '.join(STRATEGIES)}")
        try:
            self.node_ports = parse_ports(node_ports)
        except ValueError as exc:
            self.node_ports = []
            self._config_error = f"{NODE_PORTS_ENV} must look like 30000-30099 or 30000,30001 ({exc})"
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._pending: tuple[threading.Event, dict[str, BaseException]] | None = None
        self._failed: tuple[float, str] | None = None  # (retry after, reason)
        self._placement_locks: dict[str, threading.Lock] = {}
        self._server_ip: str | None = None

    # ------------------------------------------------------------------ connection
    def _where(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"

    def _ray(self) -> Any:
        """The ray module, connected (once, lazily); LaunchError with the reason otherwise.

        ``ray.init`` retries an unreachable address for ever, so the address is tried with a
        plain TCP connect first, the wait for ``ray.init`` is capped at ``INIT_TIMEOUT_S``, and
        a failure is remembered for ``RETRY_AFTER_S`` (the monitor polls every 2 s).
        """
        if self._config_error:
            raise LaunchError(self._config_error)
        try:
            import ray
        except ImportError as exc:
            raise LaunchError(f"Ray is not installed; install it with {INSTALL_HINT}") from exc
        with self._init_lock:
            if not ray.is_initialized():
                if self._failed is not None and time.monotonic() < self._failed[0]:
                    raise LaunchError(self._failed[1])
                try:
                    self._connect(ray)
                except LaunchError as exc:
                    self._failed = (time.monotonic() + RETRY_AFTER_S, str(exc))
                    raise
                self._failed = None
                log.info("connected to %s (Ray %s, namespace %s)", self._where(), ray.__version__, NAMESPACE)
            if self._server_ip is None:
                self._server_ip = ray.util.get_node_ip_address()
            return ray

    def _connect(self, ray: Any) -> None:
        hint = (f"Start a cluster with `ray start --head` and set {ADDRESS_ENV} to its address, or unset it to "
                f"start a local instance (Ray comes with {INSTALL_HINT})")
        if self._pending is None:
            problem = _unreachable(self.address)
            if problem:
                raise LaunchError(f"cannot join {self._where()}: {problem}. {hint}")
            runtime_env = None
            if self.ship_workers:  # Ray uploads a local directory only for the whole job
                import workers

                runtime_env = {"py_modules": [str(Path(workers.__file__).resolve().parent)]}
            self._pending = _init_on_keeper_thread(ray, self.address, runtime_env)
        done, outcome = self._pending
        if not done.wait(INIT_TIMEOUT_S):  # still trying in the background; the next call waits again
            raise LaunchError(f"{self._where()} did not answer within {INIT_TIMEOUT_S:.0f} s. {hint}")
        self._pending = None
        if "error" in outcome:
            exc = outcome["error"]
            raise LaunchError(f"cannot start or join {self._where()}: {type(exc).__name__}: {exc}. {hint}") from exc

    def available(self) -> tuple[bool, str]:
        try:
            self._ray()
        except LaunchError as exc:
            return False, str(exc)
        return True, ""

    # ------------------------------------------------------------------ placement
    def _placement_lock(self, cluster_id: str) -> threading.Lock:
        with self._lock:
            return self._placement_locks.setdefault(cluster_id, threading.Lock())

    def _place(self, ray: Any, spec: NodeSpec, bundle: dict[str, float], deadline: float) -> tuple[Any, str]:
        """Create and wait for the node's placement group; (group, Ray node id it landed on)."""
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        with self._placement_lock(spec.cluster_id):
            with self._lock:
                used = Counter(e.ray_node_id for e in self._entries.values()
                               if e.cluster_id == spec.cluster_id and e.ray_node_id)
            attempts: list[tuple[str, dict[str, Any], float | None]] = []
            if used and self.strategy == "SPREAD":
                fits = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in used
                        and all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items())]
                if fits:
                    selector = [{NODE_ID_LABEL: f"!in({','.join(sorted(used))})"}]
                    attempts.append(("PACK", {"bundle_label_selector": selector}, SPREAD_WAIT_S))
            elif used and self.strategy == "PACK":
                target = used.most_common(1)[0][0]
                attempts.append(("STRICT_PACK", {"_soft_target_node_id": target}, None))
            attempts.append((self.strategy, {}, None))
            for strategy, extra, wait_s in attempts:
                try:
                    pg = placement_group([bundle], strategy=strategy, name=actor_name(spec.node_id),
                                         lifetime="detached", **extra)
                except TypeError:  # an older Ray without this option: place it the plain way
                    continue
                left = deadline - time.monotonic()
                try:
                    ray.get(pg.ready(), timeout=max(0.1, min(left, wait_s) if wait_s else left))
                except ray.exceptions.GetTimeoutError:
                    remove_placement_group(pg)
                    if wait_s is not None and time.monotonic() < deadline:
                        log.info("no free Ray node outside %s for %s; placing it anywhere", sorted(used), spec.node_id)
                        continue
                    raise LaunchError(
                        f"the Ray cluster found no room for node {spec.node_id} ({bundle}) within the start-up "
                        f"timeout; resources free now: {_short(ray.available_resources())}. Add Ray nodes, "
                        "remove nodes, or ask for fewer CPUs/GPUs per node") from None
                ray_node = placement_group_table(pg)["bundles_to_node_id"][0]
                with self._lock:
                    self._entries[spec.node_id] = _Entry(spec.cluster_id, pg=pg, ray_node_id=ray_node)
                return pg, ray_node
        raise LaunchError(f"could not create a placement group for node {spec.node_id}")  # pragma: no cover

    # ------------------------------------------------------------------ launch
    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        ray = self._ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        deadline = time.monotonic() + timeout_s
        bundle = {k: float(v) for k, v in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)) if v and v > 0}
        if "CPU" not in bundle and "GPU" not in bundle:
            raise LaunchError(f"node {spec.node_id} asks for no CPU and no GPU; give num_cpus > 0")
        pg, _ = self._place(ray, spec, bundle, deadline)
        options: dict[str, Any] = dict(
            name=actor_name(spec.node_id), namespace=NAMESPACE, lifetime="detached", max_restarts=0,
            max_concurrency=4,  # ping and stop are answered while another call waits
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0),
        )
        actor = None
        try:
            actor = _remote_actor_class().options(**options).remote(spec.node_id, spec.cluster_id)
            with self._lock:
                self._entries[spec.node_id].actor = actor
            ref = actor.start.remote(spec.role, str(spec.sandbox), spec.threads, spec.token, self._server_ip,
                                     self.node_ports, max(1.0, deadline - time.monotonic()),
                                     tuple(str(r) for r in spec.allowed_roots), spec.controller_url)
            info = ray.get(ref, timeout=max(1.0, deadline - time.monotonic() + 5))
        except Exception as exc:
            self._discard(ray, spec.node_id, actor)
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                reason = f"did not start listening within {timeout_s:.0f} s"
            else:
                reason = f"failed to start: {_cause(exc)}"
            tail = log_tail(spec.sandbox / NODE_LOG_NAME, 20)
            raise LaunchError(f"node {spec.node_id} (Ray actor {actor_name(spec.node_id)}) {reason}"
                              + (f"; end of its log:\n{tail}" if tail else "")) from exc
        if info["host"] != LOOPBACK and not self.advertise_host:
            self._discard(ray, spec.node_id, actor)
            raise LaunchError(
                f"node {spec.node_id} was placed on Ray node {info['node_ip']}, another host, but nodes on this "
                "host listen on 127.0.0.1 only, where it could not reach the rendezvous store one of them may "
                f"host; set {ADVERTISE_ENV} to an address of this host that the Ray nodes reach, and restart the "
                "server")
        log.info("node %s runs as Ray actor %s (%s) on %s, control API %s:%d",
                 spec.node_id, actor_name(spec.node_id), info["actor_id"], info["node_ip"], info["host"], info["port"])
        return NodeHandle(spec.node_id, info["host"], int(info["port"]), int(info["pid"]), info["actor_id"])

    # ------------------------------------------------------------------ handles
    def _actor(self, ray: Any, handle: NodeHandle) -> Any:
        """The node's actor handle: cached, or found by name (after a server restart); None if gone."""
        with self._lock:
            entry = self._entries.get(handle.node_id)
        if entry is not None and entry.actor is not None:
            return entry.actor
        try:
            actor = ray.get_actor(actor_name(handle.node_id), namespace=NAMESPACE)
        except ValueError:
            return None
        actor_id = getattr(getattr(actor, "_actor_id", None), "hex", lambda: None)()
        if handle.ref and actor_id and actor_id != handle.ref:
            return None  # the name belongs to another actor: this node's is gone
        try:
            info = ray.get(actor.info.remote(), timeout=self.ping_timeout_s * 5)
        except ray.exceptions.RayActorError:
            return None
        except ray.exceptions.GetTimeoutError:
            info = {}
        with self._lock:
            self._entries[handle.node_id] = _Entry(
                info.get("cluster_id", ""), pg=info.get("placement_group"), actor=actor,
                ray_node_id=info.get("ray_node_id"))
        log.info("re-attached to Ray actor %s of node %s", actor_name(handle.node_id), handle.node_id)
        return actor

    def _reap(self, ray: Any, node_id: str) -> None:
        """Forget a node whose actor is gone and remove its placement group."""
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            entry = self._entries.pop(node_id, None)
        pg = entry.pg if entry is not None else None
        if pg is None:
            try:
                pg = ray.util.get_placement_group(actor_name(node_id))
            except ValueError:
                return
        try:
            remove_placement_group(pg)
        except Exception as exc:  # already removed
            log.debug("removing the placement group of %s: %s", node_id, exc)

    def _discard(self, ray: Any, node_id: str, actor: Any) -> None:
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:
                log.debug("killing the actor of %s: %s", node_id, exc)
        self._reap(ray, node_id)

    # ------------------------------------------------------------------ poll / stop
    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        try:
            ray = self._ray()
        except LaunchError:
            return False, None
        actor = self._actor(ray, handle)
        if actor is None:
            self._reap(ray, handle.node_id)
            return False, None
        try:
            ray.get(actor.ping.remote(), timeout=self.ping_timeout_s)
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            # Unreachable or busy. Ray declares an actor dead only once it declares its host dead
            # (its health checks, ~15 s or more), but a control API that refuses connections has no
            # agent behind it: the process (or its whole host) is gone. Silence decides otherwise.
            if _refuses_connections(handle.host, handle.port):
                log.warning("node %s: Ray cannot reach its actor and %s:%d refuses connections; it is gone",
                            handle.node_id, handle.host, handle.port)
                return False, None
            return True, None
        except ray.exceptions.RayActorError:
            self._reap(ray, handle.node_id)
            return False, None
        return True, None

    def _gone(self, ray: Any, actor: Any, handle: NodeHandle, timeout_s: float) -> bool:
        """Wait until the actor answers as dead, its name is free and (on this host) its process ended."""
        from flow_nexus_server.launchers.local import pid_exists

        deadline = time.monotonic() + timeout_s
        while True:
            dead = False
            try:
                ray.get(actor.ping.remote(), timeout=1)
            except ray.exceptions.ActorUnavailableError:
                pass
            except ray.exceptions.RayActorError:
                dead = True
            except ray.exceptions.GetTimeoutError:
                pass
            if dead:
                try:
                    ray.get_actor(actor_name(handle.node_id), namespace=NAMESPACE)
                    dead = False
                except ValueError:
                    pass
            if dead and handle.host == LOOPBACK and handle.pid is not None:
                dead = not pid_exists(handle.pid)
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.1)

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        try:
            ray = self._ray()
        except LaunchError as exc:
            log.warning("cannot reach Ray to stop node %s: %s", handle.node_id, exc)
            return False
        actor = self._actor(ray, handle)
        gone = True
        if actor is not None:
            try:
                ray.get(actor.stop.remote(grace_s), timeout=grace_s + 5)
            except Exception as exc:  # dead already, or stuck: ray.kill below ends it either way
                log.debug("graceful stop of %s: %s", handle.node_id, _cause(exc))
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:
                log.debug("ray.kill of %s: %s", handle.node_id, exc)
            gone = self._gone(ray, actor, handle, timeout_s=10)
            if not gone:
                log.warning("Ray actor %s of node %s is still alive after ray.kill", actor_name(handle.node_id),
                            handle.node_id)
                return False
        self._reap(ray, handle.node_id)
        return gone


def _unreachable(address: str | None) -> str:
    """Why a ``host:port`` address does not accept TCP connections ('' when it does, or when
    the address is not of that form: None, "auto", "local", "ray://...")."""
    if not address or "://" in address:
        return ""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return ""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return ""
    except OSError as exc:
        return f"nothing answers at {address} ({exc.strerror or exc})"


def _refuses_connections(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when ``host:port`` actively refuses a TCP connection (nothing listens there any more);
    False when it accepts, or gives no answer in time (a cut link looks like a busy node)."""
    if not port:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _init_on_keeper_thread(ray: Any, address: str | None,
                           runtime_env: dict[str, Any] | None) -> tuple[threading.Event, dict[str, BaseException]]:
    """``ray.init`` on a thread that lives as long as the server.

    A local instance's processes (GCS, raylet, ...) are started with ``PR_SET_PDEATHSIG``, which
    Linux fires when the *thread* that started them ends; the server calls launchers from worker
    threads that come and go, so the call is made on a thread of its own that never ends.
    Returns an event set once ``ray.init`` has returned, and the dict its error lands in.
    """
    done = threading.Event()
    outcome: dict[str, BaseException] = {}

    def keep() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True, runtime_env=runtime_env,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except BaseException as exc:
            outcome["error"] = exc
            done.set()
            return
        done.set()
        threading.Event().wait()  # keep the thread (and so the processes ray.init started) alive

    threading.Thread(target=keep, name="ray-driver", daemon=True).start()
    return done, outcome


def _cause(exc: BaseException) -> str:
    """The error a Ray task raised (not Ray's wrapper with the remote traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _short(resources: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in resources.items() if k in ("CPU", "GPU", "memory") or k.startswith("GPU")}
