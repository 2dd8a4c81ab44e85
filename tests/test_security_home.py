"""The state home is private, tokens stay out of logs, command lines and replies, and HTTP
accepts the documented sizes.

Issue 11, findings 2 (server half: a 0755 home, a 0644 database, query-string tokens in a
world-readable log) and 9 (HTTP capped bodies at 4 MiB while uploads are documented to 8 MiB).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import sqlite3
import stat
from pathlib import Path

import httpx
import httpx2
import psutil
import pytest
from conftest import HttpServer, ok
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from flow_nexus_server.config import HTTP_MAX_BODY_BYTES, Limits, Settings
from flow_nexus_server.logs import PrivateRotatingFileHandler
from flow_nexus_server.server import build_server
from flow_nexus_server.service.clusters import ClusterService

pytestmark = pytest.mark.anyio

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_private(*paths: Path) -> None:
    """Directories 0700, files 0600 (or tighter): no group or other bit anywhere."""
    for path in paths:
        assert path.exists(), path
        assert mode(path) & 0o077 == 0, f"{path} is {oct(mode(path))}"


def make_loose_home(home: Path) -> list[Path]:
    """A home as an older version left it: 0755 directories, 0644 files (database, logs, a node's)."""
    node = home / "clusters" / "dnc_old" / "nodes" / "node_old"
    node.mkdir(parents=True)
    files = [home / "state.db", home / "server.log", home / "server.log.1", node / "node.log"]
    for f in files:
        f.write_bytes(b"")
    for p in [home, home / "clusters", home / "clusters" / "dnc_old", home / "clusters" / "dnc_old" / "nodes", node]:
        p.chmod(0o755)
    for f in files:
        f.chmod(0o644)
    return [home, node, *files]


@pytest.fixture
def loose_umask():
    """The test process as an MCP host might run it: umask 022 (cli.main sets 077; in-process servers do not)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


async def test_in_memory_server_creates_everything_private(home, loose_umask):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "modes"}))["cluster_id"]
        node = (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["node_id"]
        await ok(client, "neural_node_upload", {"node_id": node, "file_name": "data/mine.csv", "content": "a,b\n"})
        cluster_dir = home / "clusters" / cid
        sandbox = cluster_dir / "nodes" / node
        assert mode(home) == 0o700 and mode(home / "clusters") == 0o700 and mode(sandbox) == 0o700
        assert mode(home / "state.db") == 0o600 and mode(home / "state.db-wal") == 0o600
        assert mode(sandbox / "node.log") == 0o600 and mode(sandbox / "data" / "mine.csv") == 0o600
        assert_private(cluster_dir, cluster_dir / "nodes", sandbox / "data", sandbox / "agent.json",
                       home / "spawner.log", *home.glob("state.db*"))
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


def test_log_file_and_its_rotations_are_private(tmp_path, loose_umask):
    log_file = tmp_path / "server.log"
    handler = PrivateRotatingFileHandler(log_file, maxBytes=200, backupCount=2, encoding="utf-8")
    logger = logging.getLogger("test_security_home.rotation")
    logger.addHandler(handler)
    try:
        for i in range(20):
            logger.warning("line %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "server.log.1").exists()
    for f in tmp_path.glob("server.log*"):
        assert mode(f) == 0o600, f


def test_a_loose_home_is_tightened_with_one_log_line(home, tmp_path, caplog, loose_umask):
    loose = make_loose_home(home)
    elsewhere = tmp_path / "not-ours.txt"
    elsewhere.write_text("x")
    elsewhere.chmod(0o644)
    (home / "clusters" / "link").symlink_to(elsewhere)  # a symlink is not followed
    with caplog.at_level(logging.INFO):
        service = ClusterService(Settings.from_env(home))
    try:
        assert_private(*loose, *home.glob("state.db*"))
        assert mode(elsewhere) == 0o644
        lines = [r.getMessage() for r in caplog.records if "removed group/other access" in r.getMessage()]
        assert len(lines) == 1, lines
        assert str(home) in lines[0] and "state.db" in lines[0]
        caplog.clear()
    finally:
        service.close()
    with caplog.at_level(logging.INFO):  # nothing left to tighten: nothing said
        ClusterService(Settings.from_env(home)).close()
    assert not [r for r in caplog.records if "removed group/other access" in r.getMessage()]


# ---------------------------------------------------------------------- the HTTP server (CLI)

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`flow-nexus-server --transport http` started on a loose home left by an older version."""
    home = tmp_path_factory.mktemp("http-home") / "home"
    loose = make_loose_home(home)
    server = HttpServer(home, "-" + secrets.token_urlsafe(24)).wait_ready()
    try:
        yield server, loose
    finally:
        server.stop()


def http_client(server: HttpServer):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {server.token}"},
                              timeout=httpx2.Timeout(60, read=300))
    return http, Client(streamable_http_client(server.url, http_client=http), read_timeout_seconds=120)


async def test_cli_server_home_and_node_files_are_private(served):
    server, loose = served
    home = server.home
    log_text = (home / "server.log").read_text()
    assert "removed group/other access" in log_text and "state.db" in log_text, log_text
    http, client = http_client(server)
    async with http, client:
        cid = (await ok(client, "neural_cluster_init", {"name": "cli-modes"}))["cluster_id"]
        deploy = await ok(client, "neural_node_deploy", {"cluster_id": cid})
        node = deploy["node_id"]
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        sandbox = home / "clusters" / cid / "nodes" / node
        assert mode(home) == 0o700 and mode(sandbox) == 0o700
        for f in ("state.db", "state.db-wal", "server.log"):
            assert mode(home / f) == 0o600, f
        assert mode(sandbox / "node.log") == 0o600
        assert_private(*loose, sandbox / "agent.json", home / "spawner.log")

        # The cluster token is in the (private) database only: not in a log, a command line or a reply.
        with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as db:
            (token,) = db.execute("SELECT token FROM clusters WHERE id = ?", (cid,)).fetchone()
        assert len(token) >= 32
        replies = json.dumps([deploy, status])
        cmdline = " ".join(psutil.Process(deploy["nodes"][0]["pid"]).cmdline())
        for where, text in [("replies", replies), ("node command line", cmdline), ("stderr", server.stderr()),
                            ("server.log", (home / "server.log").read_text()),
                            ("node.log", (sandbox / "node.log").read_text(errors="replace")),
                            ("spawner.log", (home / "spawner.log").read_text(errors="replace"))]:
            assert token not in text, f"the cluster token is in the {where}"
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


def test_query_string_tokens_are_refused_and_never_logged(served):
    server, _ = served
    secret = "SECRET" + secrets.token_hex(8)
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for headers in ({}, {"Authorization": f"Bearer {server.token}"}):
            reply = http.post(f"/mcp?access_token={secret}", headers={**MCP_HEADERS, **headers},
                              content=json.dumps(INIT))
            assert reply.status_code == 400, reply.text
            message = reply.json()["error"]["message"]
            assert "Authorization: Bearer" in message and secret not in message
        assert http.get(f"/healthz?x=1&access_token={secret}").status_code == 400
        assert http.get(f"/healthz?note={secret}").status_code == 200  # other queries pass, and are not logged
    # A request with the token in its URL leaves no trace of it anywhere on disk or on stderr.
    for f in server.home.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data, f
            assert server.token.encode() not in data, f
    assert secret not in server.stderr() and secret not in server.stdout()


async def test_http_accepts_the_documented_upload_size_and_refuses_more_clearly(served):
    server, _ = served
    size = Limits().max_upload_bytes - 1024
    payload = os.urandom(size)
    http, client = http_client(server)
    async with http, client:
        cid = (await ok(client, "neural_cluster_init", {"name": "sizes"}))["cluster_id"]
        node = (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["node_id"]
        reply = await ok(client, "neural_node_upload", {"node_id": node, "file_name": "big.bin", "encoding": "base64",
                                                        "content": base64.b64encode(payload).decode()})
        assert reply["bytes"] == size
        assert (server.home / "clusters" / cid / "nodes" / node / "big.bin").read_bytes() == payload
        with pytest.raises(Exception) as too_big:
            await client.call_tool("neural_node_upload", {"node_id": node, "file_name": "huge.txt",
                                                          "content": "x" * (HTTP_MAX_BODY_BYTES + 1)})
        text = str(too_big.value)
        assert f"at most {HTTP_MAX_BODY_BYTES} bytes over HTTP" in text, text
        # The session survived the refusal.
        assert (await ok(client, "neural_cluster_status", {"cluster_id": cid}))["cluster_id"] == cid
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
