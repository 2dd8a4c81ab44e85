"""The dashboard's routes on the HTTP front-end: the page, its two static files, the login
exchange, the minting of login codes, and the feed (forwarded to the controller).

The page is plain HTML, JavaScript and CSS shipped in the package (``flow_nexus_server/web``);
it draws its charts itself on canvas and loads nothing from elsewhere (its Content-Security-Policy
says so). ``CheckCaller`` (http_app) lets a request reach these routes only with the dashboard's
cookie, except the login route (which checks its code) and ``POST /dashboard/login-codes`` (which
needs the bearer token, like ``/mcp``).
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from flow_nexus_server.dashboard_access import (
    DASHBOARD_FEED_PATH,
    DASHBOARD_PATH,
    LOGIN_CODES_PATH,
    LOGIN_PATH,
    DashboardAccess,
)

STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the login URL carries a code: it must not travel in a Referer
    "Cache-Control": "no-store",
}


def web_file(name: str) -> bytes:
    return resources.files("flow_nexus_server").joinpath("web", name).read_bytes()


def dashboard_message(status: int, title: str, body_html: str) -> HTMLResponse:
    """A small page that says what is wrong and what to do."""
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><p>{body_html}</p>")
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def dashboard_routes(access: DashboardAccess, forward: Callable[[Request], Awaitable[Response]]) -> list[Route]:
    async def page(_: Request) -> Response:
        return Response(web_file("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return Response("not found", status_code=404, headers=SECURITY_HEADERS)
        return Response(web_file(name), media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    async def login(request: Request) -> Response:
        session = access.redeem(request.query_params.get("code", ""))
        if session is None:
            return dashboard_message(401, "This login link does not work", "It was used already, has expired "
                                     f"(links last {access.code_ttl_s:.0f} s) or was never issued. Get a new one "
                                     "with <code>flow-nexus-server dashboard --new-link</code>.")
        reply = RedirectResponse(DASHBOARD_PATH, status_code=303, headers=SECURITY_HEADERS)
        reply.headers.append("Set-Cookie", access.cookie(session))
        return reply

    async def new_code(_: Request) -> JSONResponse:
        return JSONResponse({"login_path": f"{LOGIN_PATH}?code={access.new_code()}",
                             "expires_in_s": access.code_ttl_s}, headers={"Cache-Control": "no-store"})

    return [
        Route(DASHBOARD_PATH, page, methods=["GET"]),
        Route(DASHBOARD_PATH + "/static/{name}", static, methods=["GET"]),
        Route(LOGIN_PATH, login, methods=["GET"]),
        Route(LOGIN_CODES_PATH, new_code, methods=["POST"]),
        Route(DASHBOARD_FEED_PATH, forward, methods=["GET"]),
    ]
