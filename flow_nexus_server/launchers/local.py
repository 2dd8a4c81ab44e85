"""Local launcher: one ``python -m workers.agent`` process per node, in its own process group."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from flow_nexus_server.home import PRIVATE_UMASK, open_private
from flow_nexus_server.launchers.base import (
    LaunchError,
    NodeHandle,
    NodeSpec,
    allowed_root_args,
    controller_args,
    log_tail,
)
from workers.priority import NICE_ENV
from workers.protocol import READY_FILE, TOKEN_ENV

log = logging.getLogger(__name__)

NODE_LOG = "node.log"


class SubprocessLauncher:
    name = "subprocess"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # pid -> Popen, for reaping
        self._lock = threading.Lock()

    def available(self) -> tuple[bool, str]:
        return True, ""

    def command(self, spec: NodeSpec) -> list[str]:
        return [
            self.python, "-m", "workers.agent",
            "--node-id", spec.node_id,
            "--cluster-id", spec.cluster_id,
            "--role", spec.role,
            "--sandbox", str(spec.sandbox),
            "--threads", str(spec.threads),
            *allowed_root_args(spec),
            *controller_args(spec),
        ]

    def environment(self, spec: NodeSpec) -> dict[str, str]:
        env = base_environment()
        env[TOKEN_ENV] = spec.token  # environment, not argv: `ps` must not show it
        env["OMP_NUM_THREADS"] = str(spec.threads)
        env[NICE_ENV] = str(spec.cpu_nice)
        return env

    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        spec.sandbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        ready = spec.sandbox / READY_FILE
        ready.unlink(missing_ok=True)
        log_path = spec.sandbox / NODE_LOG
        with open(log_path, "ab", opener=open_private) as out:
            proc = subprocess.Popen(
                self.command(spec),
                cwd=spec.sandbox,
                env=self.environment(spec),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: terminate reaches its children too
                umask=PRIVATE_UMASK,  # what the node writes is its owner's only
            )
        with self._lock:
            self._procs[proc.pid] = proc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                self._forget(proc.pid)
                raise LaunchError(
                    f"node {spec.node_id} exited with code {code} during start-up; "
                    f"end of its log:\n{log_tail(log_path, 20)}"
                )
            if ready.exists():
                info = json.loads(ready.read_text())
                return NodeHandle(spec.node_id, "127.0.0.1", int(info["port"]), proc.pid, str(proc.pid))
            time.sleep(0.05)
        self.terminate(NodeHandle(spec.node_id, "127.0.0.1", 0, proc.pid, str(proc.pid)), grace_s=1)
        raise LaunchError(
            f"node {spec.node_id} did not start listening within {timeout_s:.0f} s; "
            f"end of its log:\n{log_tail(log_path, 20)}"
        )

    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        pid = handle.pid
        if pid is None:
            return False, None
        with self._lock:
            proc = self._procs.get(pid)
        if proc is not None:
            code = proc.poll()
            return code is None, code
        # Not our child (the server restarted, or a warm spawner forked it).
        return node_process_alive(handle), None

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        pid = handle.pid
        if pid is None:
            return True
        gone = terminate_process_group(pid, lambda: self.is_alive(handle)[0], grace_s, handle.node_id)
        if gone:
            self._forget(pid)
        return gone

    def _forget(self, pid: int) -> None:
        with self._lock:
            proc = self._procs.pop(pid, None)
        if proc is not None:
            try:
                proc.wait(timeout=1)  # reap, so no zombie is left
            except subprocess.TimeoutExpired:
                pass


def base_environment() -> dict[str, str]:
    """The environment every node process starts from: the server's, unbuffered, with the
    directory holding the `workers` package the server uses first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def terminate_process_group(pid: int, alive: Callable[[], bool], grace_s: float, what: str) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace_s``; True once
    ``alive()`` says it is gone. ``alive`` must be pid-reuse safe: it is asked before each signal."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not alive():
            break
        try:
            os.killpg(pid, sig)  # the node leads its own process group
        except ProcessLookupError:
            break
        except PermissionError:
            log.warning("not allowed to signal node %s (pid %d)", what, pid)
            return False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)
    # A dying process loses its command line before it is gone: wait for the pid itself too.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and pid_exists(pid):
        time.sleep(0.02)
    return not alive()


# A ref names one process for good as (pid, create time). psutil's create time is in seconds
# since the epoch and follows adjustments of the wall clock (psutil's documentation says so), so
# two readings are compared with a tolerance; a pid reused within that second is not a real risk.
PROCESS_REF_SEP = "@"
CREATE_TIME_TOLERANCE_S = 1.0


def process_create_time(pid: int) -> float | None:
    """psutil's create time of ``pid`` (seconds since the epoch), or None when no process, or
    only a zombie, has this pid. (pid, create time) names one process for good."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def process_ref(pid: int, create_time: float) -> str:
    """A launcher ref that survives pid reuse: ``"<pid>@<create time>"``."""
    return f"{pid}{PROCESS_REF_SEP}{create_time:.3f}"


def parse_process_ref(ref: str) -> tuple[int, float | None] | None:
    """(pid, create time) from a ref that names one process; None for any other form (a bare pid).

    Besides ``"<pid>@<create time>"`` this reads ``"<pid>:<start time>"``, the form databases
    written before psutil hold (start time: clock ticks since boot, Linux), converted to a
    create time; where it cannot be converted the create time is None (liveness only).
    """
    pid, sep, when = (ref or "").partition(PROCESS_REF_SEP)
    if sep:
        try:
            return int(pid), float(when)
        except ValueError:
            return None
    pid, sep, ticks = (ref or "").partition(":")
    if not sep:
        return None
    try:
        return int(pid), _ticks_to_create_time(int(ticks))
    except ValueError:
        return None


def _ticks_to_create_time(ticks: int) -> float | None:
    """A start time in clock ticks since boot as psutil's create time (the same sum psutil does
    on Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    return ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time()


def same_process(pid: int, create_time: float | None) -> bool:
    """True when ``pid`` runs, is not a zombie and was created at ``create_time`` (any time
    when that is None)."""
    now = process_create_time(pid)
    if now is None:
        return False
    return create_time is None or abs(now - create_time) <= CREATE_TIME_TOLERANCE_S


def node_process_alive(handle: NodeHandle) -> bool:
    """Liveness of a node process that is not (or no longer) our child, from its ref.

    ``"<pid>@<create time>"`` (warm-spawned nodes): that very process runs and is not a zombie.
    A bare pid (cold nodes): the pid runs this node's agent command line.
    """
    parsed = parse_process_ref(handle.ref)
    if parsed is not None:
        pid, create_time = parsed
        return (handle.pid is None or handle.pid == pid) and same_process(pid, create_time)
    return handle.pid is not None and _runs_node(handle.pid, handle.node_id)


def _runs_node(pid: int, node_id: str) -> bool:
    """True when ``pid`` is a live process whose command line names ``node_id``."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and node_id in proc.cmdline()
    except psutil.Error:
        return False


def pid_exists(pid: int) -> bool:
    """True when a process (not a zombie) with this pid exists."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # a zombie psutil cannot read counts as gone too
        return False
    except psutil.AccessDenied:  # someone else's process, but it exists
        return True
