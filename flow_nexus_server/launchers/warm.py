"""Warm local launcher: node agents forked from a template process that has imported torch.

A cold start (``python -m workers.agent``) pays interpreter start-up and ``import torch`` for
every node. ``WarmSubprocessLauncher`` starts ``python -m workers.spawner`` once (lazily, on
the first launch, or eagerly with ``start()``) and asks it over a Unix-domain socket to fork
each node. A forked node is isolated as a cold one is (own session and process group, its
sandbox as cwd, ``node.log``, token in its environment only); see ``workers/spawner.py``.

Forked nodes are not this process's children, so a node is named by
``ref = "<pid>@<create time>"`` (psutil's): liveness checks survive pid reuse and a server
restart. Where the spawner cannot start, nodes start cold through ``SubprocessLauncher`` (a
warning is logged), with its usual ``ref = "<pid>"``. Both launchers accept both forms of ref
(and the ``"<pid>:<start time>"`` refs of older databases).

Forking a process that has imported torch is only safe on Linux (macOS: frameworks do not
survive a fork; Windows: no fork), so ``local_launcher`` picks this launcher on Linux only and
the plain ``SubprocessLauncher`` elsewhere, or wherever ``FLOW_NEXUS_SPAWNER=plain``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from flow_nexus_server.home import PRIVATE_UMASK, open_private
from flow_nexus_server.launchers.base import LaunchError, NodeHandle, NodeSpec, log_tail
from flow_nexus_server.launchers.local import (
    NODE_LOG,
    SubprocessLauncher,
    base_environment,
    node_process_alive,
    parse_process_ref,
    process_create_time,
    process_ref,
    terminate_process_group,
)
from workers.protocol import READY_FILE, TOKEN_ENV

log = logging.getLogger(__name__)

SPAWNER_LOG = "spawner.log"
REQUEST_TIMEOUT_S = 15.0  # one request/reply on the spawner socket
RETRY_AFTER_S = 60.0  # after a failed spawner start, nodes start cold this long before a retry
ADOPT_WAIT_S = 5.0  # the spawner vanished after a spawn request: how long to look for the node
REAP_WAIT_S = 2.0  # a node that looks gone: how long the spawner may take to reap it (exit code)
_SUN_PATH_MAX = 100  # bytes; the kernel's limit is 108 with the terminating NUL
SPAWNER_ENV = "FLOW_NEXUS_SPAWNER"  # "plain": never fork nodes from a warm template


def warm_spawner_refusal(spawner: str) -> str | None:
    """Why nodes must not be forked from a warm template here, or None where they may (``spawner``:
    Settings.spawner)."""
    if spawner == "plain":
        return f"{SPAWNER_ENV}=plain"
    if not hasattr(os, "fork"):
        return f"{sys.platform} has no fork"
    if not sys.platform.startswith("linux"):
        return f"forking a process that has imported torch is unsafe on {sys.platform}"
    return None


def local_launcher(state_dir: Path | str, spawner: str = "warm") -> WarmSubprocessLauncher | SubprocessLauncher:
    """The launcher for local node processes: warm (forked from a template) where that is safe,
    else plain (one cold ``python -m workers.agent`` per node), saying so in the log."""
    refusal = warm_spawner_refusal(spawner)
    if refusal is None:
        return WarmSubprocessLauncher(state_dir)
    log.info("local nodes start as plain subprocesses, one cold interpreter each (%s)", refusal)
    return SubprocessLauncher()


class _SpawnerGone(Exception):
    """The spawner connection failed; ``sent`` says whether the request had gone out."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class WarmSubprocessLauncher:
    """Drop-in for ``SubprocessLauncher``: same interface, same isolation, forked starts.

    ``state_dir``: where the spawner's log (``spawner.log``) and, when the path is short
    enough, its socket go (the server's state home is the natural choice); created if missing.
    ``python``: the interpreter for the spawner and for cold fall-back starts.
    ``start_timeout_s``: how long the spawner may take to import torch and listen.
    """

    name = "subprocess"  # the same kind of nodes: local processes; refs are interchangeable

    def __init__(self, state_dir: Path | str, python: str = sys.executable,
                 start_timeout_s: float = 60.0) -> None:
        self.state_dir = Path(state_dir)
        self.python = python
        self.start_timeout_s = start_timeout_s
        self.cold = SubprocessLauncher(python)
        self._lock = threading.Lock()  # starting and stopping the spawner
        self._io_lock = threading.Lock()  # one request/reply at a time on the connection
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._socket_path: Path | None = None
        self._tmpdir: str | None = None
        self._failed_at: float | None = None

    # ------------------------------------------------------------------ the spawner

    @property
    def spawner_pid(self) -> int | None:
        """Pid of the running spawner, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None and self._sock is not None else None

    def available(self) -> tuple[bool, str]:
        return True, ""  # without a spawner, nodes start cold

    def start(self) -> bool:
        """Start the spawner now rather than on the first launch; True once it serves."""
        with self._lock:
            return self._ensure_spawner()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the spawner (closing its connection ends it; SIGTERM, then SIGKILL, if it
        lingers) and remove its socket. Nodes keep running: stop them with ``terminate``,
        which, like ``is_alive``, works without the spawner. A later ``launch`` starts a new
        spawner."""
        with self._lock:
            self._stop_spawner(timeout_s)
            self._failed_at = None

    def __enter__(self) -> WarmSubprocessLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_spawner(self) -> bool:
        """With ``_lock`` held: True when a spawner serves, starting one if need be."""
        if self.spawner_pid is not None:
            return True
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            return False
        self._stop_spawner(1.0)  # what is left of one that died
        try:
            self._start_spawner()
        except Exception as exc:
            log.warning("the warm node spawner did not start, nodes start cold for the next %.0f s: %s",
                        RETRY_AFTER_S, exc)
            self._failed_at = time.monotonic()
            self._stop_spawner(1.0)
            return False
        self._failed_at = None
        return True

    def _start_spawner(self) -> None:
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir.resolve() / f"spawner-{os.getpid()}.sock"
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            self._tmpdir = tempfile.mkdtemp(prefix="flow-nexus-")  # 0700
            path = Path(self._tmpdir) / "spawner.sock"
        path.unlink(missing_ok=True)
        self._socket_path = path
        env = base_environment()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # no runtime may start a thread pool in the template
        log_path = self.state_dir / SPAWNER_LOG
        with open(log_path, "ab", opener=open_private) as out:
            self._proc = subprocess.Popen(
                [self.python, "-m", "workers.spawner", "--socket", str(path), "--parent-pid", str(os.getpid())],
                cwd=self.state_dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the server is the server's to handle
                umask=PRIVATE_UMASK,  # the nodes it forks inherit it: what they write is private
            )
        deadline = started + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"it exited with code {code}; end of {log_path}:\n{log_tail(log_path, 20)}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"it did not listen within {self.start_timeout_s:.0f} s; "
                                   f"end of {log_path}:\n{log_tail(log_path, 20)}")
            time.sleep(0.02)
        sock.settimeout(REQUEST_TIMEOUT_S)
        with self._io_lock:
            self._sock, self._rfile = sock, sock.makefile("rb")
        reply = self._request({"op": "ping"})
        if not reply.get("ok"):
            raise RuntimeError(f"it answered {reply}")
        log.info("warm node spawner pid %d ready in %.2f s", self._proc.pid, time.monotonic() - started)

    def _stop_spawner(self, timeout_s: float) -> None:
        """With ``_lock`` held: end the spawner and clean up after it."""
        with self._io_lock:
            self._disconnect()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)  # the closed connection ends it
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
            self._socket_path = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _disconnect(self) -> None:
        """With ``_io_lock`` held."""
        if self._rfile is not None:
            try:
                self._rfile.close()
            except OSError:
                pass
        if self._sock is not None:
            self._sock.close()
        self._sock = self._rfile = None

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._io_lock:
            if self._sock is None:
                raise _SpawnerGone("the spawner is not running", sent=False)
            try:
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as exc:
                self._disconnect()
                raise _SpawnerGone(f"sending to the spawner failed: {exc}", sent=False) from exc
            try:
                line = self._rfile.readline()
            except OSError as exc:
                self._disconnect()
                raise _SpawnerGone(f"no reply from the spawner: {exc}", sent=True) from exc
            if not line:
                self._disconnect()
                raise _SpawnerGone("the spawner closed its connection", sent=True)
        return json.loads(line)

    def _exit_code(self, pid: int | None) -> int | None:
        """The exit code of a node the running spawner forked and reaped, when it knows it."""
        if pid is None or self.spawner_pid is None:
            return None
        deadline = time.monotonic() + REAP_WAIT_S
        while True:
            try:
                reply = self._request({"op": "status", "pid": pid})
            except (_SpawnerGone, ValueError):
                return None
            # Asked once the node looks gone: a multi-threaded process shows as a zombie while its
            # other threads still exit, and only then can the spawner reap it.
            if not reply.get("alive") or time.monotonic() > deadline:
                return reply.get("exit_code")
            time.sleep(0.02)

    # ------------------------------------------------------------------ nodes

    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        spec.sandbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        ready = spec.sandbox / READY_FILE
        ready.unlink(missing_ok=True)
        with self._lock:
            warm = self._ensure_spawner()
        if not warm:
            log.warning("starting node %s cold: the warm spawner is not available", spec.node_id)
            return self.cold.launch(spec, timeout_s)
        started = time.monotonic()
        env = self.cold.environment(spec)
        env.pop(TOKEN_ENV, None)  # travels in its own field, straight into the child's os.environ
        request = {
            "op": "spawn", "node_id": spec.node_id, "cluster_id": spec.cluster_id, "role": spec.role,
            "sandbox": str(spec.sandbox.resolve()), "threads": spec.threads, "token": spec.token, "env": env,
            "allowed_roots": [str(r) for r in spec.allowed_roots], "controller_url": spec.controller_url,
        }
        try:
            reply = self._request(request)
        except _SpawnerGone as exc:
            if exc.sent:  # it may have forked the node before it went away
                handle = self._adopt(spec, ready, min(ADOPT_WAIT_S, timeout_s))
                if handle is not None:
                    return handle
            log.warning("starting node %s cold: %s", spec.node_id, exc)
            return self.cold.launch(spec, timeout_s)
        if "error" in reply:
            log.warning("starting node %s cold: the warm spawner refused it: %s", spec.node_id, reply["error"])
            return self.cold.launch(spec, timeout_s)
        pid = int(reply["pid"])
        create_time = reply.get("create_time") or process_create_time(pid)
        handle = NodeHandle(spec.node_id, "127.0.0.1", 0, pid, process_ref(pid, create_time or 0))
        log_path = spec.sandbox / NODE_LOG
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            port = _ready_port(ready, pid)
            if port is not None:
                handle.port = port
                return handle
            if not node_process_alive(handle):
                time.sleep(0.05)  # let the spawner reap it, so its exit code is known
                code = self._exit_code(pid)
                raise LaunchError(
                    f"node {spec.node_id} exited with code {code if code is not None else 'unknown'} "
                    f"during start-up; end of its log:\n{log_tail(log_path, 20)}"
                )
            time.sleep(0.01)
        self.terminate(handle, grace_s=1)
        raise LaunchError(
            f"node {spec.node_id} did not start listening within {timeout_s:.0f} s; "
            f"end of its log:\n{log_tail(log_path, 20)}"
        )

    def _adopt(self, spec: NodeSpec, ready: Path, wait_s: float) -> NodeHandle | None:
        """A node the spawner forked before it went away, found by its ready file."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                info = json.loads(ready.read_text())
                pid, port = int(info["pid"]), int(info["port"])
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
                continue
            create_time = process_create_time(pid)
            try:
                cwd_ok = Path(psutil.Process(pid).cwd()) == spec.sandbox.resolve()
            except psutil.Error:
                cwd_ok = False
            if create_time is None or not cwd_ok:
                return None
            log.warning("the warm spawner went away while starting node %s; the node (pid %d) runs",
                        spec.node_id, pid)
            return NodeHandle(spec.node_id, "127.0.0.1", port, pid, process_ref(pid, create_time))
        return None

    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        if parse_process_ref(handle.ref) is None:
            return self.cold.is_alive(handle)  # started cold (fall-back, or before a restart)
        if node_process_alive(handle):
            return True, None
        return False, self._exit_code(handle.pid)

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        if parse_process_ref(handle.ref) is None:
            return self.cold.terminate(handle, grace_s)
        if handle.pid is None:
            return True
        return terminate_process_group(handle.pid, lambda: node_process_alive(handle), grace_s, handle.node_id)


def _ready_port(ready: Path, pid: int) -> int | None:
    """The port from the sandbox's ready file once the node ``pid`` has written it."""
    try:
        info = json.loads(ready.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("pid") != pid:
        return None
    try:
        return int(info["port"])
    except (KeyError, TypeError, ValueError):
        return None
