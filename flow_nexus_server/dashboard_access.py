"""Who may see the dashboard: one-time login codes exchanged for a cookie session.

``flow-nexus-server dashboard`` prints a login link carrying a one-time code (or asks a running
front-end for one with the bearer token: ``POST /dashboard/login-codes``). Opening it trades the
code for a random session id in an ``HttpOnly; SameSite=Strict`` cookie scoped to
``/dashboard`` and redirects to the bare ``/dashboard`` URL, so the address bar, the history and
a bookmark never keep the code. A code works once, within ``LOGIN_CODE_TTL_S``; the bearer token
itself never reaches the browser. Codes and sessions live in the front-end's memory only
(hashed): a restarted front-end needs a new link.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

LOGIN_CODE_TTL_S = 120.0
SESSION_TTL_S = 12 * 3600.0
COOKIE_NAME = "flow_nexus_dashboard"
DASHBOARD_PATH = "/dashboard"
LOGIN_PATH = "/dashboard/login"
LOGIN_CODES_PATH = "/dashboard/login-codes"  # POST with the bearer token: a new one-time code
DASHBOARD_FEED_PATH = "/dashboard/feed"  # served by the controller, forwarded by the front-end


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class DashboardAccess:
    def __init__(self, code_ttl_s: float = LOGIN_CODE_TTL_S, session_ttl_s: float = SESSION_TTL_S) -> None:
        self.code_ttl_s = code_ttl_s
        self.session_ttl_s = session_ttl_s
        self._codes: dict[str, float] = {}  # sha256(code) -> expiry (time.monotonic)
        self._sessions: dict[str, float] = {}  # sha256(session id) -> expiry
        self._lock = threading.Lock()

    def new_code(self) -> str:
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._drop_expired()
            self._codes[_digest(code)] = time.monotonic() + self.code_ttl_s
        return code

    def redeem(self, code: str) -> str | None:
        """A new session id for a valid code (which is used up); None for an unknown, used or expired one."""
        with self._lock:
            expiry = self._codes.pop(_digest(code), None)
            if expiry is None or expiry < time.monotonic():
                return None
            session = secrets.token_urlsafe(32)
            self._sessions[_digest(session)] = time.monotonic() + self.session_ttl_s
            return session

    def valid_cookie(self, cookie_header: str | None) -> bool:
        from starlette.requests import cookie_parser  # here: the CLI imports this module, and starts fast

        session = cookie_parser(cookie_header or "").get(COOKIE_NAME)
        if not session:
            return False
        with self._lock:
            expiry = self._sessions.get(_digest(session))
            return expiry is not None and expiry >= time.monotonic()

    def cookie(self, session: str) -> str:
        return (f"{COOKIE_NAME}={session}; Path={DASHBOARD_PATH}; Max-Age={int(self.session_ttl_s)}; HttpOnly; "
                "SameSite=Strict")

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for table in (self._codes, self._sessions):
            for key in [k for k, expiry in table.items() if expiry < now]:
                del table[key]
