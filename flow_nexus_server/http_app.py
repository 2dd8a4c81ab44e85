"""The HTTP front-end: MCP over streamable HTTP at ``/mcp``, forwarded to the home's controller.

``create_app()`` returns a Starlette app for uvicorn (``flow-nexus-server --transport http``). It
owns no cluster: it checks each request and passes it on over the controller's HTTP socket
(``controller.channel``), where the SDK's streamable HTTP app serves it; its process may stop
at any time without touching the work.

- Every request to ``/mcp`` and ``/metrics`` must carry ``Authorization: Bearer <token>``
  (compared in constant time); anything else gets 401 before it is forwarded, so an
  unauthenticated request does nothing.
- DNS-rebinding protection: the ``Host`` header must be one of ``allowed_hosts`` (default: the
  bound host and localhost/127.0.0.1, with the port), else 421; a browser ``Origin`` must match
  them too, else 403.
- A request that carries ``access_token`` in its query string is refused (400): only the
  header is accepted, and a URL ends up in logs and shell histories.
- Request bodies may be up to ``HTTP_MAX_BODY_BYTES`` (room for the largest tool argument); a
  larger one gets 413 with a JSON-RPC error sentence, before the body is read.
- ``GET /healthz`` answers ``{"status": "ok", "version": ...}`` without auth; ``GET /metrics``
  is the controller's Prometheus text.
- ``/dashboard`` is the dashboard page (``dashboard_pages``): reached with a cookie session that a
  one-time login code buys (``dashboard_access``), never with the bearer token; its feed
  ``/dashboard/feed`` is forwarded to the controller like ``/mcp``.
- While it runs, the app holds the controller's ``/attach`` stream (so idle clusters are not
  stopped under it) and starts a new controller if the one it used is gone.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, QueryParams
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flow_nexus_server import __version__
from flow_nexus_server.config import HTTP_MAX_BODY_BYTES, Settings
from flow_nexus_server.controller.channel import ControllerPaths, ControllerUnavailable, ensure_controller
from flow_nexus_server.dashboard_access import DASHBOARD_PATH, LOGIN_CODES_PATH, LOGIN_PATH, DashboardAccess
from flow_nexus_server.dashboard_pages import dashboard_message, dashboard_routes

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, ::, a name) is not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """The ``Host`` header form: ``[::1]:8765`` for IPv6, ``127.0.0.1:8765`` otherwise."""
    name = host.strip("[]")
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def default_allowed_hosts(host: str, port: int) -> list[str]:
    hosts = [host_port(host, port), f"localhost:{port}", f"127.0.0.1:{port}"]
    if is_loopback(host) and ":" in host:
        hosts.append(f"[::1]:{port}")
    return list(dict.fromkeys(hosts))


def allowed_hosts_and_origins(host: str, port: int, allowed_hosts: Iterable[str] | None = None
                              ) -> tuple[list[str], list[str]]:
    """Host header values accepted (an allowed host given without a port is allowed on ``port``
    too), and the browser origins made of them."""
    hosts = default_allowed_hosts(host, port)
    for h in allowed_hosts or ():
        h = h.strip()
        if not h:
            continue
        hosts.append(h)
        if h.startswith("["):
            has_port = not h.endswith("]")  # [::1]:8765 vs [::1]
        else:
            has_port = h.count(":") == 1  # example.org:8765 vs example.org or a bare IPv6 address
        if not has_port:
            hosts.append(host_port(h, port))
    hosts = list(dict.fromkeys(hosts))
    origins = list(dict.fromkeys(f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")))
    return hosts, origins


class GuardRequests:
    """Refuses, before anything reads the body: a token in the query string, and a body whose
    Content-Length passes the limit (bodies sent without one are capped by the SDK's own check,
    given the same limit). The answer is a JSON-RPC error, so MCP clients show its sentence."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = HTTP_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self.problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, message = problem
        reply = JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}},
                             status_code=status)
        await reply(scope, receive, send)

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        if "access_token" in QueryParams(scope.get("query_string", b"")):
            return 400, ("a token in the URL (?access_token=...) is not accepted: send it in the header "
                         "'Authorization: Bearer <token>'")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, (f"the request body is {int(declared)} bytes; this server accepts at most "
                         f"{self.max_body_bytes} bytes over HTTP. Send less per call, or put the data under an "
                         "allowed root (the state home or FLOW_NEXUS_DATA_ROOTS) and pass its path")
        return None


async def healthz(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": __version__})


class CheckCaller:
    """Host / Origin checks and the bearer token, for everything but ``/healthz``; the dashboard's
    pages take its cookie session instead of the token (its login route checks the code)."""

    def __init__(self, app: ASGIApp, token: str, hosts: list[str], origins: list[str],
                 access: DashboardAccess | None = None) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self.app, self.token = app, f"Bearer {token}".encode()
        self.hosts, self.origins = set(hosts), set(origins)
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if headers.get("host") not in self.hosts:
            reply: Response = Response("Invalid Host header", status_code=421)
        elif headers.get("origin") and headers["origin"] not in self.origins:
            reply = Response("Invalid Origin header", status_code=403)
        elif self.access is not None and is_dashboard_page(scope["path"]):
            if scope["path"] == LOGIN_PATH or self.access.valid_cookie(headers.get("cookie")):
                await self.app(scope, receive, send)
                return
            reply = dashboard_message(401, "Not logged in", "Open the login link that <code>flow-nexus-server "
                                      "dashboard</code> printed, or get a new one with <code>flow-nexus-server "
                                      "dashboard --new-link</code>.")
        elif not hmac.compare_digest(headers.get("authorization", "").encode("utf-8", "replace"), self.token):
            reply = JSONResponse({"error": "invalid_token", "error_description": "Authentication required"},
                                 status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        else:
            await self.app(scope, receive, send)
            return
        await reply(scope, receive, send)


def is_dashboard_page(path: str) -> bool:
    """The dashboard's own routes but the one that mints login codes (that one takes the token)."""
    return (path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")) and path != LOGIN_CODES_PATH


# Not forwarded: this hop's own connection handling, and the caller's credentials.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization",
                "authorization", "cookie", "host", "content-length"}


def create_app(
    paths: ControllerPaths,
    *,
    settings: Settings,
    token: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allowed_hosts: Iterable[str] | None = None,
    access: DashboardAccess | None = None,
) -> Starlette:
    """The HTTP front-end app for the controller at ``paths``; ``access`` holds the dashboard's
    login codes and cookie sessions (a new one when not given)."""
    hosts, origins = allowed_hosts_and_origins(host, port, allowed_hosts)
    access = access or DashboardAccess()
    client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(paths.http_socket)),
                               base_url="http://controller", timeout=httpx.Timeout(30.0, read=None))

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = client.build_request(request.method, target, headers=headers, content=request.stream())
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.TransportError:
            log.warning("the controller of %s did not answer a forwarded request", settings.home, exc_info=True)
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
                "code": -32603, "message": "the controller that runs the clusters is not reachable; it is being "
                                           "restarted, try again in a few seconds"}}, status_code=503)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept,
                                 background=BackgroundTask(answer.aclose))

    async def stay_attached() -> None:
        """Hold the controller's /attach stream; start a new controller when it is gone."""
        while True:
            try:
                async with client.stream("GET", "/attach") as stream:
                    async for _ in stream.aiter_raw():
                        pass
            except httpx.HTTPError:
                pass
            await anyio.sleep(1.0)
            try:
                await anyio.to_thread.run_sync(ensure_controller, settings)
            except ControllerUnavailable as exc:
                log.error("%s", exc)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with client, anyio.create_task_group() as tg:
            tg.start_soon(stay_attached)
            log.info("MCP streamable HTTP at %s, forwarded to the controller of %s (auth: bearer token; allowed "
                     "hosts: %s)", MCP_PATH, settings.home, ", ".join(hosts))
            yield
            tg.cancel_scope.cancel()

    methods = ["GET", "POST", "DELETE"]
    return Starlette(
        routes=[Route("/healthz", healthz, methods=["GET"]), Route(MCP_PATH, forward, methods=methods),
                Route("/metrics", forward, methods=["GET"]), *dashboard_routes(access, forward)],
        lifespan=lifespan,
        middleware=[Middleware(GuardRequests),
                    Middleware(CheckCaller, token=token, hosts=hosts, origins=origins, access=access)],
    )
