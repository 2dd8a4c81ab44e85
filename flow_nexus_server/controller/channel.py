"""The local channel between front-ends and the controller: the front-end side (kept free of
the MCP SDK and torch so that a front-end starts in a fraction of a second).

Files in the state home (0700, so only its owner reaches them):

- ``controller.sock``: MCP itself, one connection per stdio front-end, framed as on stdio
  (one JSON-RPC message per line). The front-end copies bytes both ways and knows nothing of
  MCP, so every request, progress notification and subscription works as if the host talked to
  the controller directly.
- ``controller-http.sock``: HTTP for the HTTP front-end (``/mcp``, streamable HTTP) and for the
  CLI (``/status``, ``/stop``, ``/metrics``); ``/attach`` is held open by an HTTP front-end for
  as long as it runs, so the controller knows one is there.
- ``controller.lock``: held (``flock``) by the running controller, with its pid in it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flow_nexus_server.config import Settings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ControllerPaths:
    home: Path

    @property
    def socket(self) -> Path:
        return self.home / "controller.sock"

    @property
    def http_socket(self) -> Path:
        return self.home / "controller-http.sock"

    @property
    def lock(self) -> Path:
        return self.home / "controller.lock"

    @property
    def stderr(self) -> Path:
        return self.home / "controller.stderr"


# ---------------------------------------------------------------- front-end side
class ControllerUnavailable(RuntimeError):
    """No controller answers on this home and none could be started; the message says why."""


def connect(paths: ControllerPaths) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
    except OSError:
        sock.close()
        raise
    return sock


def running(paths: ControllerPaths) -> bool:
    try:
        connect(paths).close()
    except OSError:
        return False
    return True


def ensure_controller(settings: Settings, timeout_s: float = START_TIMEOUT_S) -> ControllerPaths:
    """The home's controller, started (detached, in its own session) when none answers."""
    paths = ControllerPaths(settings.home)
    if running(paths):
        return paths
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(paths.stderr, "ab") as err:  # start-up crashes land here; then logging takes over
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "flow_nexus_server", "--home", str(settings.home), "controller"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running(paths):
            return paths
        code = proc.poll()
        if code is not None and code != 0:
            tail = paths.stderr.read_text(errors="replace")[-2000:] if paths.stderr.exists() else ""
            raise ControllerUnavailable(f"the controller for {settings.home} exited with code {code}: {tail}")
        time.sleep(0.05)  # exit code 0: another front-end's controller won the lock; it is starting
    raise ControllerUnavailable(f"no controller answered on {paths.socket} within {timeout_s:.0f} s; "
                                f"see {settings.log_file}")


def relay_stdio(paths: ControllerPaths) -> int:
    """Copy the host's stdin to the controller and its replies to stdout, until either side ends.

    This process owns nothing: closing stdin, SIGTERM or SIGKILL end only this connection."""
    import threading

    sock = connect(paths)

    def upstream() -> None:
        try:
            while data := os.read(0, 1 << 16):
                sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)  # the controller ends this session once it has answered
            except OSError:
                pass

    threading.Thread(target=upstream, name="stdin-to-controller", daemon=True).start()
    while True:
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            return 0
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]


def control_client(paths: ControllerPaths, timeout_s: float = 60.0) -> httpx.Client:
    """HTTP over the controller's second socket (status, stop, metrics)."""
    import httpx  # here, not at the top: a stdio front-end starts without it (and without mcp)

    return httpx.Client(transport=httpx.HTTPTransport(uds=str(paths.http_socket)), base_url="http://controller",
                        timeout=timeout_s)


def control_request(paths: ControllerPaths, method: str, path: str, **kwargs: Any) -> Any:
    with control_client(paths) as client:
        reply = client.request(method, path, **kwargs)
        reply.raise_for_status()
        return reply.json()
