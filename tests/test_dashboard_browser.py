"""The dashboard in headless Chromium (Debian's ``chromium``; skipped where it is not installed):
log in with the printed link, watch a training session's curve gain points while it runs, see a
killed node turn failed, and find the bearer token nowhere in the page or the server's log.

Chromium is driven over its DevTools protocol (a websocket; a few commands: navigate, evaluate)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HttpServer, StdioRpc, server_command, server_env, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: install Debian's chromium package "
                                "(apt-get install -y chromium; .ci/run does) to run the dashboard's browser test")


class Browser:
    """Headless Chromium and a DevTools-protocol session on its one page."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        flags = ["--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to start its sandbox as root (CI containers)
        self.proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        port = wait_for(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 60, "DevTools port")
        pages = wait_for(lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                                  if t["type"] == "page"], 30, "a page target")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None,
                                                   open_timeout=30))
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # events arrive in between; this client wants only its answer
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.eval("document.readyState") == "complete", 30, f"{url} to load")

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, httpx.HTTPError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def test_dashboard_in_chromium(home, tmp_path, browser):
    server = HttpServer(home, None, "dashboard").wait_ready()  # token generated into <home>/http-token
    rpc = None
    try:
        link = wait_for(lambda: re.search(r"log in \(one use[^)]*\): (\S+)", server.stdout()), 30, "the link")[1]
        code = link.split("code=", 1)[1]
        token = (home / "http-token").read_text().strip()
        assert link.startswith(f"{server.base}/dashboard/login?code=") and token not in server.stdout()

        browser.goto(link)
        assert browser.eval("location.pathname + location.search") == "/dashboard"  # the code is not kept
        assert browser.eval("document.cookie") == ""  # HttpOnly: no script reads the session
        assert httpx.get(link).status_code == 401  # the link worked once

        rpc = StdioRpc(start_server(home))
        rpc.initialize()
        cid = rpc.tool("neural_cluster_init", {"name": "browser"})["cluster_id"]
        nodes = rpc.tool("neural_node_deploy", {"cluster_id": cid, "count": 2})["nodes"]
        rpc.tool("neural_cluster_connect", {"cluster_id": cid})
        sid = rpc.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 300,
                                                    "batch_size": 64})["session_id"]

        def points() -> int:
            return browser.eval(f"Number(document.querySelector('[data-session-id=\"{sid}\"]')"
                                "?.dataset.points || 0)")

        first = wait_for(points, 90, "the session's first points")
        more = wait_for(lambda: points() > first and points(), 90, "the curve to gain points")
        assert more > first
        assert browser.eval("document.querySelectorAll('#sessions canvas').length") >= 2
        assert browser.eval(f"document.querySelector('[data-session-id=\"{sid}\"]').dataset.status") == "running"

        victim = nodes[1]
        os.kill(victim["pid"], signal.SIGKILL)
        row = f"document.querySelector('tr[data-node-id=\"{victim['node_id']}\"]')"
        wait_for(lambda: browser.eval(f"{row}?.dataset.status") == "failed", 60, "the killed node to show failed")
        assert browser.eval(f"{row}.textContent").count("failed") >= 1
        wait_for(lambda: browser.eval(f"document.querySelector('[data-session-id=\"{sid}\"]').dataset.status")
                 == "failed", 60, "the session to show failed")
        assert browser.eval("document.querySelector('#events').textContent").count("session_failed") == 1

        page = browser.eval("document.documentElement.outerHTML")
        assert token not in page and code not in page
        log = (home / "server.log").read_text(errors="replace") + server.stderr()
        assert token not in log and code not in log
        assert "/dashboard/login" in log  # the access log has the request, without its query string

        # Another link for another browser, asked with the bearer token (read from <home>/http-token).
        fresh = subprocess.run([server_command(), "--port", str(server.port), "dashboard", "--new-link"],
                               env=server_env(home), capture_output=True, text=True, timeout=60)
        assert fresh.returncode == 0, fresh.stderr
        second = re.search(r"log in \(one use[^)]*\): (\S+)", fresh.stdout)[1]
        assert second != link and httpx.get(second).status_code == 303
    finally:
        if rpc is not None:
            rpc.proc.stdin.close()
            rpc.proc.wait(timeout=30)
        server.stop()
