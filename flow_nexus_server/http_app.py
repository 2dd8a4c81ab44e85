"""Streamable HTTP: the MCP endpoint at ``/mcp`` (bearer-token auth) and ``GET /healthz``.

``create_app()`` returns a Starlette app for uvicorn (``flow-nexus-server --transport http``):

- ``/mcp`` is the SDK's streamable HTTP app. With a token, every request must carry
  ``Authorization: Bearer <token>``; the SDK's bearer middleware answers 401 before the
  request reaches the MCP session manager, so an unauthenticated request does nothing.
- DNS-rebinding protection stays on: the ``Host`` header must be one of ``allowed_hosts``
  (default: the bound host and localhost/127.0.0.1, with the port).
- A request that carries ``access_token`` in its query string is refused (400): only the
  header is accepted, and a URL ends up in logs and shell histories.
- Request bodies may be up to ``HTTP_MAX_BODY_BYTES`` (room for the largest tool argument); a
  larger one gets 413 with a JSON-RPC error sentence, before the body is read.
- ``GET /healthz`` answers ``{"status": "ok", "version": ...}`` without auth.
- The Starlette lifespan enters ``session_manager.run()``, which runs the MCP server's own
  lifespan: it creates (or adopts) the ``ClusterService`` and closes it (every node stopped)
  when the app shuts down.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flow_nexus_server import __version__
from flow_nexus_server.config import HTTP_MAX_BODY_BYTES, Settings
from flow_nexus_server.service.clusters import ClusterService

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
CLIENT_ID = "operator"
SCOPE = "cluster"


class StaticTokenVerifier(TokenVerifier):
    """Accepts exactly one shared secret, compared in constant time."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._token = token.encode("utf-8")

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            given = token.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates and the like: not our token
            return None
        if hmac.compare_digest(given, self._token):
            return AccessToken(token=token, client_id=CLIENT_ID, scopes=[SCOPE])
        return None


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


def transport_security(host: str, port: int, allowed_hosts: Iterable[str] | None = None) -> TransportSecuritySettings:
    """DNS-rebinding protection on; an allowed host given without a port is allowed on ``port`` too."""
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
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def auth_settings(host: str, port: int) -> AuthSettings:
    """Resource-server settings for a static bearer token: no authorization server, no token resource check."""
    base = f"http://{host_port(host, port)}"
    return AuthSettings(
        issuer_url=base,  # required by the SDK; no OAuth metadata is published (resource_server_url is None)
        resource_server_url=None,
        required_scopes=[SCOPE],
        validate_token_resource=False,
    )


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


def create_app(
    *,
    service: ClusterService | None = None,
    settings: Settings | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> Starlette:
    """The HTTP app. Without ``token`` the MCP endpoint is unauthenticated (the CLI allows that on loopback only)."""
    from flow_nexus_server.server import build_server

    if token:
        mcp = build_server(settings, service, token_verifier=StaticTokenVerifier(token), auth=auth_settings(host, port))
    else:
        mcp = build_server(settings, service)
    security = transport_security(host, port, allowed_hosts)
    mcp_app = mcp.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security, host=host,
                                      max_request_body_size=HTTP_MAX_BODY_BYTES)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # A mounted app's own lifespan never runs: enter the session manager (and with it the
        # MCP server's lifespan, which closes the ClusterService) here.
        async with mcp.session_manager.run():
            log.info("MCP streamable HTTP at %s (auth: %s; allowed hosts: %s)",
                     MCP_PATH, "bearer token" if token else "none", ", ".join(security.allowed_hosts))
            yield

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), Mount("/", app=mcp_app)], lifespan=lifespan,
                    middleware=[Middleware(GuardRequests)])
    app.state.mcp = mcp
    return app
