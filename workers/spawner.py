"""Warm spawner: a per-host template process that forks node agents on request.

``python -m workers.spawner --socket PATH [--parent-pid PID]`` imports torch, numpy, pydantic
and the agent's modules once, then serves requests on a Unix-domain socket (mode 0600), one
JSON object per line, one JSON reply per line:

- ``{"op": "spawn", "node_id", "cluster_id", "role", "sandbox", "threads", "token", "env"}``
  (``op`` may be left out) forks a node agent and answers ``{"pid": int, "create_time": float}``
  (psutil's create time: seconds since the epoch) or ``{"error": str}``.
- ``{"op": "status", "pid": int}`` answers ``{"pid", "alive", "exit_code", "known"}`` for a
  node this spawner forked (``exit_code`` once it has been reaped).
- ``{"op": "ping"}`` answers ``{"ok": true, "pid", "threads", "children"}``;
  ``{"op": "shutdown"}`` ends the spawner.

A forked node gets what a cold ``python -m workers.agent`` start gets: its own session and
process group (``os.setsid``), its sandbox as cwd, stdin from /dev/null and stdout/stderr
appended to ``<sandbox>/node.log``, the environment sent in ``env`` (the server's, as the cold
launcher builds it) plus its token in ``FLOW_NEXUS_NODE_TOKEN`` (environment only, never
argv) and ``OMP_NUM_THREADS``, default signal handlers, none of the spawner's descriptors;
then it runs ``workers.agent.run`` and ends with ``os._exit``.

Fork safety: the template never starts a thread (BLAS/OpenMP pools are pinned to one thread
while the libraries load, and the thread count is checked before every fork), never runs a
torch op, never touches CUDA and never imports ``workers.training``. Each node sets its own
torch/OpenMP thread count after the fork.

The spawner ends when the first connection to it (the launcher's) closes, on
``{"op": "shutdown"}``, on SIGTERM/SIGINT, or when its parent process is gone (the parent pid
is polled twice a second; PR_SET_PDEATHSIG is not used because it fires when the *thread*
that started the spawner ends, and launchers start it from pool threads). Nodes it forked
live in their own sessions and outlive it.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import psutil

log = logging.getLogger("workers.spawner")

TOKEN_ENV = "FLOW_NEXUS_NODE_TOKEN"  # == workers.protocol.TOKEN_ENV (checked in main)
NODE_LOG = "node.log"
ROLES = ("worker", "parameter_server", "aggregator", "validator")  # == workers.protocol.ROLES (checked in main)
MAX_REQUEST = 4 << 20  # bytes in one request line
EXITED_KEPT = 4096  # exit codes remembered for status queries
# Runtimes that start worker threads when they load unless told to use one.
PINNED_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Signals the template handles itself; a node gets the handlers a fresh interpreter has.
_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_inherited_env: dict[str, str] = {}  # the environment before the thread pins (main fills it)
_start_cwd = ""  # the template's cwd, which `python -m` put first on sys.path


def thread_count() -> int:
    """OS threads of this process; 1 means forking is safe."""
    return psutil.Process().num_threads()


def warm_imports() -> None:
    """Load what every node needs, without starting a thread or running a torch op."""
    import numpy  # noqa: F401
    import pydantic  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    import workers.agent  # noqa: F401  (http.server, concurrent.futures, the protocol models)
    import workers.group  # noqa: F401
    import workers.protocol as protocol

    assert protocol.TOKEN_ENV == TOKEN_ENV and protocol.READY_FILE == "agent.json" and protocol.ROLES == ROLES


def _create_time(pid: int) -> float | None:
    """psutil's create time of a child, zombies included (it is not reaped yet)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _set_process_name(name: str) -> None:
    """Linux comm name (what `ps -o comm` and `top` show), so forked nodes are told apart."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class SpawnError(Exception):
    """A spawn request that cannot be served; the message goes back to the caller."""


class Spawner:
    def __init__(self, path: str, parent_pid: int) -> None:
        self.path = path
        self.parent_pid = parent_pid
        self.stopping = False
        self.children: dict[int, str] = {}  # live (unreaped) pid -> node id
        self.exited: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.buffers: dict[socket.socket, bytearray] = {}
        self.owner: socket.socket | None = None  # the first connection: its end is ours

        try:
            os.unlink(path)  # a socket left by a spawner that was killed
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket exists with 0600 from the start
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.listener.listen(64)
        self.listener.setblocking(False)

        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up pipe does the work
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_stop_signal)

        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        self.stopping = True

    # ------------------------------------------------------------------ loop

    def serve_forever(self) -> None:
        while not self.stopping:
            if os.getppid() != self.parent_pid:
                log.info("the server (pid %d) is gone: stopping", self.parent_pid)
                break
            for key, _ in self.selector.select(timeout=0.5):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self.wake_r:
                    self._drain_wakeups()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            self.reap()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.buffers[conn] = bytearray()
            self.selector.register(conn, selectors.EVENT_READ)
            if self.owner is None:
                self.owner = conn

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self.buffers[conn]
        buf += data
        while not self.stopping and conn in self.buffers:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_REQUEST:
                    log.warning("request over %d bytes: dropping the connection", MAX_REQUEST)
                    self._drop(conn)
                return
            line = bytes(buf[:nl])
            buf[:nl + 1] = b""
            if line.strip():
                self._send(conn, self.handle(line))

    def _send(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:  # a reader that does not read (or is gone) loses its connection
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if conn not in self.buffers:
            return
        self.selector.unregister(conn)
        del self.buffers[conn]
        conn.close()
        if conn is self.owner:
            log.info("the launcher closed its connection: stopping")
            self.stopping = True

    # ------------------------------------------------------------------ requests

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise SpawnError("a request is a JSON object")
            op = req.get("op", "spawn")
            if op == "spawn":
                return self.spawn(req)
            if op == "status":
                return self.status(int(req["pid"]))
            if op == "ping":
                return {"ok": True, "pid": os.getpid(), "threads": thread_count(),
                        "children": len(self.children)}
            if op == "shutdown":
                self.stopping = True
                return {"ok": True}
            raise SpawnError(f"unknown op {op!r}")
        except SpawnError as exc:
            return {"error": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": f"invalid request: {type(exc).__name__}: {exc}"}
        except Exception as exc:  # the template keeps serving whatever one request does
            log.exception("request failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def status(self, pid: int) -> dict[str, Any]:
        self.reap()
        if pid in self.children:
            return {"pid": pid, "alive": True, "exit_code": None, "known": True}
        if pid in self.exited:
            return {"pid": pid, "alive": False, "exit_code": self.exited[pid], "known": True}
        return {"pid": pid, "alive": False, "exit_code": None, "known": False}

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            node_id = self.children.pop(pid, "?")
            self.exited[pid] = code
            while len(self.exited) > EXITED_KEPT:
                self.exited.popitem(last=False)
            log.info("node %s (pid %d) exited with code %d", node_id, pid, code)

    def spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        node_id, cluster_id = str(req["node_id"]), str(req["cluster_id"])
        role = str(req.get("role") or "worker")
        sandbox = Path(str(req["sandbox"]))
        threads = int(req.get("threads") or 1)
        token = req.get("token")
        env = req.get("env")
        roots = req.get("allowed_roots") or []
        controller_url = req.get("controller_url")
        if role not in ROLES:
            raise SpawnError(f"unknown role {role!r}")
        if not sandbox.is_absolute():
            raise SpawnError("sandbox must be an absolute path")
        if threads < 1:
            raise SpawnError("threads must be >= 1")
        if not (isinstance(roots, list) and all(isinstance(r, str) and os.path.isabs(r) for r in roots)):
            raise SpawnError("allowed_roots must be a list of absolute paths")
        if controller_url is not None and not (isinstance(controller_url, str)
                                               and controller_url.startswith("http://")):
            raise SpawnError("controller_url must be an http:// URL")
        if not isinstance(token, str) or not token:
            raise SpawnError("no token")
        if env is not None and not (isinstance(env, dict) and
                                    all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise SpawnError("env must map strings to strings")
        n = thread_count()
        if n != 1:  # forking a multi-threaded process can leave locks held in the child
            raise SpawnError(f"the spawner runs {n} threads; refusing to fork")
        argv = ["--node-id", node_id, "--cluster-id", cluster_id, "--role", role,
                "--sandbox", str(sandbox), "--threads", str(threads),
                *[arg for root in roots for arg in ("--allowed-root", root)],
                *(["--controller-url", controller_url] if controller_url else [])]

        sys.stdout.flush()
        sys.stderr.flush()
        # No handler of ours may run in the child before it has put the defaults back.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise SpawnError(f"fork failed: {exc}") from exc
        if pid == 0:
            self._child(node_id, argv, sandbox, threads, token, env, old_mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.children[pid] = node_id
        log.info("forked node %s of cluster %s: pid %d", node_id, cluster_id, pid)
        return {"pid": pid, "create_time": _create_time(pid)}

    # ------------------------------------------------------------------ the child

    def _child(self, node_id: str, argv: list[str], sandbox: Path, threads: int, token: str,
               env: dict[str, str] | None, old_mask: Any) -> NoReturn:
        code = 1
        try:
            os.setsid()  # own session and process group: terminate reaches its children too
            signal.set_wakeup_fd(-1)
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # None of the template's descriptors: its socket, connections, wake-up pipe.
            self.selector.close()
            self.listener.close()
            for conn in self.buffers:
                conn.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

            sandbox.mkdir(parents=True, exist_ok=True)
            out = os.open(sandbox / NODE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(null)
            os.close(out)
            os.chdir(sandbox)
            if sys.path and _start_cwd and sys.path[0] == _start_cwd:
                sys.path[0] = str(sandbox)  # as `python -m workers.agent` run in the sandbox has it

            os.environ.clear()
            os.environ.update(env if env is not None else _inherited_env)
            os.environ[TOKEN_ENV] = token  # the agent takes it out of its environment at once
            os.environ["OMP_NUM_THREADS"] = str(threads)
            os.environ.setdefault("PYTHONUNBUFFERED", "1")
            _node_runtime_setup(threads)
            _set_process_name(node_id)

            from workers import agent

            sys.argv = [agent.__file__, *argv]
            code = agent.run(agent.parse_args(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:
                pass
            code = 1
        finally:
            os._exit(code)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for conn in list(self.buffers):
            conn.close()
        self.buffers.clear()
        self.selector.close()
        self.listener.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _node_runtime_setup(threads: int) -> None:
    """What a fresh process would have had differently from the template (runs in the child)."""
    import numpy

    numpy.random.seed()  # the legacy global generator: fresh entropy, not the template's
    if threads > 1:  # numpy's BLAS loaded with one thread; a cold node would read OMP_NUM_THREADS
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads, user_api="blas")
        except Exception:
            log.debug("could not set the BLAS thread count", exc_info=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.spawner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="path of the Unix-domain socket to serve on")
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="stop when this process is gone (default: the parent at start)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = args.parent_pid if args.parent_pid is not None else os.getppid()
    if os.getppid() != parent:
        log.error("the server (pid %d) is already gone", parent)
        return 1
    started = time.perf_counter()
    global _start_cwd
    _start_cwd = os.getcwd()
    _inherited_env.update(os.environ)
    for var in PINNED_THREAD_VARS:
        os.environ[var] = "1"
    warm_imports()
    gc.collect()
    gc.freeze()  # the children's collector leaves the template's objects (and their pages) alone
    n = thread_count()
    if n != 1:
        log.error("%d threads run after the imports; forking would not be safe", n)
        return 3
    spawner = Spawner(args.socket, parent)
    log.info("warm spawner pid %d ready on %s after %.2f s", os.getpid(), args.socket,
             time.perf_counter() - started)
    try:
        spawner.serve_forever()
    finally:
        spawner.close()
        log.info("warm spawner stopped (%d node(s) it forked still run)", len(spawner.children))
    return 0


if __name__ == "__main__":
    sys.exit(main())
