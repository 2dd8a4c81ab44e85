"""The controller process: ``flow-nexus-server --home H controller`` (front-ends start it).

One per state home (an ``flock`` on ``controller.lock`` decides), detached from whoever started
it. It serves MCP to every front-end over the home's sockets (``channel``), owns the services
(``core.Controller``), and ends:

- a cluster by itself after ``idle_timeout_min`` with no session running and no front-end
  attached (``IdlePolicy``);
- itself when it holds no live cluster, no running session and no front-end for
  ``FLOW_NEXUS_CONTROLLER_LINGER_S`` seconds (default 10), or on SIGTERM/SIGINT. Either way the
  nodes keep running: a later controller re-attaches them, and their leases end them if none
  ever comes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp.server import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from flow_nexus_server.config import DEFAULT_IDLE_TIMEOUT_MIN, HTTP_MAX_BODY_BYTES, Settings
from flow_nexus_server.controller.channel import ControllerPaths
from flow_nexus_server.controller.commands import store_view
from flow_nexus_server.controller.core import Controller
from flow_nexus_server.dashboard_access import DASHBOARD_FEED_PATH
from flow_nexus_server.service.dashboard import DashboardFeed
from flow_nexus_server.states import LIVE_NODE_STATES, ClusterState, SessionState
from flow_nexus_server.store import Cluster, Node, TrainingSession

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # one JSON-RPC line; stdio has no limit, HTTP front-ends cap at 32 MiB
POLICY_EVERY_S = 1.0
ATTACH_BEAT_S = 5.0


class Frontends:
    """How many front-ends are attached now, and since when none is."""

    def __init__(self) -> None:
        self.count = 0
        self.none_since: float | None = time.monotonic()

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        self.count += 1
        self.none_since = None
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self.none_since = time.monotonic()


class _SocketLines:
    """What ``stdio_server`` reads lines from and writes lines to, over a socket instead of fds 0/1."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffered = BufferedByteReceiveStream(stream)

    def __aiter__(self) -> _SocketLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self.buffered.receive_until(b"\n", MAX_MESSAGE_BYTES)
        except anyio.DelimiterNotFound:
            log.warning("a front-end sent a message over %d bytes; closing its connection", MAX_MESSAGE_BYTES)
            raise StopAsyncIteration from None
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StopAsyncIteration from None
        return line.decode("utf-8", errors="replace")

    async def write(self, text: str) -> None:
        try:
            await self.stream.send(text.encode("utf-8"))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the front-end left; its session ends when the read side sees EOF

    async def flush(self) -> None:
        pass


async def serve_mcp_connection(mcp: MCPServer, stream: anyio.abc.ByteStream) -> None:
    """One front-end's MCP session, until it disconnects."""
    lines = _SocketLines(stream)
    server = mcp._lowlevel_server  # what MCPServer.run_stdio_async drives too, over other streams
    async with stream, stdio_server(stdin=lines, stdout=lines) as (read, write):  # type: ignore[arg-type]
        await server.run(read, write, server.create_initialization_options())


def live_work(ctrl: Controller) -> tuple[list[Cluster], set[str]]:
    """(clusters with live nodes, ids of clusters with a running session)."""
    with ctrl.clusters.store.session() as s:
        clusters = list(s.scalars(select(Cluster).where(Cluster.status != ClusterState.TERMINATED)))
        with_nodes = set(s.scalars(select(Node.cluster_id).where(Node.status.in_(LIVE_NODE_STATES))))
        training = set(s.scalars(select(TrainingSession.cluster_id)
                                 .where(TrainingSession.status == SessionState.RUNNING)))
    return [c for c in clusters if c.id in with_nodes], training


class IdlePolicy:
    """Stops a cluster idle for its ``idle_timeout_min``, and says when the controller may go."""

    def __init__(self, ctrl: Controller, frontends: Frontends) -> None:
        self.ctrl = ctrl
        self.frontends = frontends
        self.idle_since: dict[str, float] = {}

    def check(self) -> bool:
        """One pass; True when the controller has nothing left to hold."""
        clusters, training = live_work(self.ctrl)
        now = time.monotonic()
        for cluster in clusters:
            if self.frontends.count or cluster.id in training:
                self.idle_since.pop(cluster.id, None)
                continue
            minutes = float(cluster.options.get("idle_timeout_min", DEFAULT_IDLE_TIMEOUT_MIN))
            since = self.idle_since.setdefault(cluster.id, now)
            if minutes > 0 and now - since >= minutes * 60:
                self.idle_since.pop(cluster.id, None)
                log.info("cluster %s idle for %.1f min (idle_timeout_min %g): stopping it", cluster.id,
                         (now - since) / 60, minutes)
                self.ctrl.clusters.event(cluster.id, "cluster_idle", f"no session and no client for {minutes:g} "
                                         "min (idle_timeout_min): stopping the cluster")
                self.ctrl.training.terminate_cluster(cluster.id)
        none_since = self.frontends.none_since
        linger_s = self.ctrl.settings.controller_linger_s
        return not clusters and not training and none_since is not None and now - none_since >= linger_s


def status_payload(ctrl: Controller, frontends: Frontends) -> dict[str, Any]:
    """What ``flow-nexus-server status`` shows: this controller, its clusters, nodes and sessions."""
    view = store_view(ctrl.clusters.store, ctrl.settings.home)
    return {**view, "controller_pid": os.getpid(), "frontends": frontends.count}


def control_app(ctrl: Controller, mcp: MCPServer, frontends: Frontends, stop: anyio.Event) -> Starlette:
    """The controller's HTTP socket: MCP for HTTP front-ends, the CLI's status / stop / metrics, and
    the dashboard page's feed."""
    # The socket is reachable by the home's owner only; Host checks and auth are the HTTP front-end's.
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp", max_request_body_size=HTTP_MAX_BODY_BYTES,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))

    async def status(_: Request) -> JSONResponse:
        return JSONResponse(await anyio.to_thread.run_sync(status_payload, ctrl, frontends))

    async def stop_route(request: Request) -> JSONResponse:
        body = await request.json()
        ids = body.get("cluster_ids") or []
        if body.get("all"):
            ids = [c.id for c in (await anyio.to_thread.run_sync(live_work, ctrl))[0]]
        stopped, errors = [], {}
        for cid in ids:
            try:
                await anyio.to_thread.run_sync(ctrl.training.terminate_cluster, cid)
                stopped.append(cid)
            except Exception as exc:  # a ServiceError sentence, or a cluster already gone
                errors[cid] = str(exc)
        if body.get("all"):
            stop.set()  # nothing is left to hold; leave once this reply is out
        return JSONResponse({"stopped": stopped, "errors": errors, "controller_pid": os.getpid()})

    async def attach(_: Request) -> StreamingResponse:
        async def beats() -> AsyncIterator[bytes]:
            with frontends.attached():
                while True:
                    yield b"attached\n"
                    await anyio.sleep(ATTACH_BEAT_S)
        return StreamingResponse(beats(), media_type="text/plain")

    feed = DashboardFeed(ctrl.clusters, ctrl.training)

    async def dashboard_feed(_: Request) -> StreamingResponse:
        # The page's server-sent events; the HTTP front-end checks the caller's cookie first.
        return StreamingResponse(feed.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def metrics(_: Request) -> Response:
        try:
            from flow_nexus_server.service.metrics import render_metrics
        except ImportError:
            return Response("no metrics in this build\n", status_code=404)
        body = await anyio.to_thread.run_sync(render_metrics, ctrl.clusters, ctrl.training)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[
        Route("/status", status, methods=["GET"]), Route("/stop", stop_route, methods=["POST"]),
        Route("/attach", attach, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
        Route(DASHBOARD_FEED_PATH, dashboard_feed, methods=["GET"]),
        Mount("/", app=mcp_app),
    ])


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the controller handles SIGTERM/SIGINT itself (``_serve``)


def private_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket that is 0600 from the start (uvicorn's own would be 0666)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def _take_lock(paths: ControllerPaths) -> int | None:
    """The lock's fd while this process holds it; None when another controller does."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run(settings: Settings) -> int:
    paths = ControllerPaths(settings.home)
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _take_lock(paths)
    if lock is None:
        log.info("another controller serves %s; leaving", settings.home)
        return 0
    for sock in (paths.socket, paths.http_socket):  # left by a controller that was killed
        sock.unlink(missing_ok=True)
    log.info("controller pid %d for %s", os.getpid(), settings.home)
    try:
        anyio.run(_serve, settings, paths)
    finally:
        for sock in (paths.socket, paths.http_socket):
            sock.unlink(missing_ok=True)
        os.close(lock)
    log.info("controller pid %d stopped", os.getpid())
    return 0


async def _serve(settings: Settings, paths: ControllerPaths) -> None:
    from flow_nexus_server.server import build_server

    ctrl = Controller(settings)
    mcp = build_server(controller=ctrl)
    frontends = Frontends()
    stop = anyio.Event()
    await ctrl.start()
    policy = IdlePolicy(ctrl, frontends)
    http = _Uvicorn(uvicorn.Config(control_app(ctrl, mcp, frontends, stop), log_config=None, lifespan="off",
                                   ws="none", access_log=False, timeout_graceful_shutdown=2))
    http_socket = private_unix_socket(paths.http_socket)

    async def serve_front_end(stream: anyio.abc.ByteStream) -> None:
        with frontends.attached():
            try:
                await serve_mcp_connection(mcp, stream)
            except Exception:  # one broken connection must not end the listener
                log.exception("a front-end connection failed")

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: the controller stops; nodes keep running", signal.Signals(signum).name)
                stop.set()
                return

    async def apply_policy() -> None:
        while not stop.is_set():
            try:
                if await anyio.to_thread.run_sync(policy.check):
                    log.info("no live cluster, session or front-end for %.0f s: the controller stops",
                             settings.controller_linger_s)
                    stop.set()
            except Exception:
                log.exception("the idle policy pass failed")
            await anyio.sleep(POLICY_EVERY_S)

    try:
        async with mcp.session_manager.run():
            listener = await anyio.create_unix_listener(paths.socket, mode=0o600)
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve_front_end)
                tg.start_soon(functools.partial(http.serve, sockets=[http_socket]))
                tg.start_soon(ctrl.publish_event_updates)
                tg.start_soon(watch_signals)
                tg.start_soon(apply_policy)
                await stop.wait()
                http.should_exit = True
                await anyio.sleep(0.2)  # let the reply that asked to stop go out
                tg.cancel_scope.cancel()
    finally:
        await ctrl.aclose(stop_nodes=False)
