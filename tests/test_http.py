"""Streamable HTTP end to end: `flow-nexus-server --transport http` as a real subprocess.

Bearer-token auth (401 without or with a wrong token, and nothing happens), /healthz,
DNS-rebinding protection, the official SDK client driving real nodes, the refusal to bind a
non-loopback address without a token, a generated token on loopback, and SIGTERM stopping every node.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
import pytest
from conftest import HttpServer, free_port, pid_alive, server_command, server_env
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from flow_nexus_server import __version__

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("error::mcp.MCPDeprecationWarning")]

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "1"}}}
CREATE = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
          "params": {"name": "neural_cluster_init", "arguments": {"name": "intruder"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@asynccontextmanager
async def http_client(server: HttpServer, token: str | None = None, mode: str = "auto") -> AsyncIterator[Client]:
    """The official SDK client over streamable HTTP, sending the bearer token on every request."""
    headers = {"Authorization": f"Bearer {token or server.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        async with Client(streamable_http_client(server.url, http_client=http), mode=mode,
                          read_timeout_seconds=120) as client:
            yield client


async def call_ok(client: Client, tool: str, args: dict) -> dict:
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool} failed: {result.content[0].text}"
    return result.structured_content


def test_healthz_needs_no_token(http_server):
    reply = httpx.get(f"{http_server.base}/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "version": __version__}


async def test_missing_or_wrong_token_gets_401_and_does_nothing(http_server):
    bad_headers = [
        {},                                                        # no Authorization at all
        {"Authorization": "Bearer wrong-token"},                   # wrong token
        {"Authorization": f"Bearer {http_server.token}x"},         # right token plus a character
        {"Authorization": f"Bearer {http_server.token[:-1]}"},     # a prefix of the right token
        {"Authorization": f"Basic {http_server.token}"},           # not a bearer scheme
        {"Authorization": "Bearer"},                               # scheme without a token
    ]
    with httpx.Client(base_url=http_server.base, timeout=30) as http:
        for extra in bad_headers:
            for body in (INIT, CREATE):
                reply = http.post("/mcp", headers={**MCP_HEADERS, **extra}, content=json.dumps(body))
                assert reply.status_code == 401, (extra, body["method"], reply.status_code, reply.text)
                assert reply.headers["www-authenticate"].startswith("Bearer")
                assert "mcp-session-id" not in reply.headers
            assert http.get("/mcp", headers={**MCP_HEADERS, **extra}).status_code == 401
            assert http.delete("/mcp", headers={**MCP_HEADERS, **extra}).status_code == 401

    # Nothing was created by any of those requests.
    async with http_client(http_server) as client:
        listed = await call_ok(client, "neural_cluster_list", {})
    assert listed["count"] == 0 and listed["clusters"] == []
    assert "cluster_created" not in http_server.stderr()

    # An SDK client with the wrong token cannot connect either: every answer it gets is a 401.
    statuses: list[int] = []

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    with pytest.raises(Exception):  # noqa: B017, PT011 - the SDK reports the 401 as a generic MCPError
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer not-the-token"},
                                      event_hooks={"response": [record]}) as http:
            async with Client(streamable_http_client(http_server.url, http_client=http)) as client:
                await client.call_tool("neural_cluster_init", {"name": "intruder"})
    assert statuses and set(statuses) == {401}, statuses
    async with http_client(http_server) as client:
        assert (await call_ok(client, "neural_cluster_list", {}))["count"] == 0


def test_dns_rebinding_protection_refuses_a_foreign_host(http_server):
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {http_server.token}", "Host": "evil.example"}
    reply = httpx.post(f"{http_server.base}/mcp", headers=headers, content=json.dumps(INIT))
    assert reply.status_code == 421
    ok = httpx.post(f"{http_server.base}/mcp", headers={**headers, "Host": f"localhost:{http_server.port}"},
                    content=json.dumps(INIT))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_lifecycle_with_the_sdk_client(http_server, mode):
    async with http_client(http_server, mode=mode) as client:
        if mode == "legacy":
            assert client.protocol_version == "2025-11-25"
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"neural_cluster_init", "neural_node_deploy", "neural_cluster_connect",
                "neural_cluster_status", "neural_cluster_terminate"} <= names

        cid = (await call_ok(client, "neural_cluster_init", {"name": f"http-{mode}"}))["cluster_id"]
        deploy = await call_ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 1})
        assert [n["status"] for n in deploy["nodes"]] == ["deployed"]
        pid = deploy["nodes"][0]["pid"]
        assert pid_alive(pid)

        conn = await call_ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 1 and conn["generation"] == 1

        status = await call_ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert [(n["alive"], n["pid"]) for n in status["nodes"]] == [(True, pid)]

        bad = await client.call_tool("neural_cluster_status", {"cluster_id": "dnc_nope"})
        assert bad.is_error and "dnc_nope" in bad.content[0].text

        metrics = httpx.get(f"{http_server.base}/metrics", headers={"Authorization": f"Bearer {http_server.token}"})
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'flow_nexus_node_up{' in metrics.text and deploy["nodes"][0]["node_id"] in metrics.text
        assert httpx.get(f"{http_server.base}/metrics").status_code == 401

        term = await call_ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"]
    assert not pid_alive(pid), "the node outlived neural_cluster_terminate"
    assert http_server.stdout() == "", "the HTTP server wrote to stdout"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
def test_non_loopback_bind_without_a_token_is_refused(home, host):
    env = server_env(home)
    env.pop("FLOW_NEXUS_TOKEN", None)
    proc = subprocess.run([server_command(), "--transport", "http", "--host", host, "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert host in proc.stderr and "token" in proc.stderr and "loopback" in proc.stderr, proc.stderr
    assert not (home / "state.db").exists(), "it started before refusing"


def test_an_empty_token_file_is_refused(home, tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    proc = subprocess.run([server_command(), "--transport", "http", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--token-file", str(empty)],
                          env=server_env(home), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "empty" in proc.stderr, proc


def test_token_file_is_used(home, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    server = HttpServer(home, None, "--token-file", str(token_file)).wait_ready()
    try:
        with httpx.Client(base_url=server.base, timeout=30) as http:
            assert http.post("/mcp", headers=MCP_HEADERS, content=json.dumps(INIT)).status_code == 401
            ok = http.post("/mcp", headers={**MCP_HEADERS, "Authorization": "Bearer from-the-file"},
                           content=json.dumps(INIT))
            assert ok.status_code == 200, ok.text
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("sig", "mode"), [(signal.SIGTERM, "legacy"), (signal.SIGINT, "auto")])
async def test_a_signal_ends_the_front_end_only(http_server, sig, mode):
    async with http_client(http_server, mode=mode) as client:
        cid = (await call_ok(client, "neural_cluster_init", {"name": "sig"}))["cluster_id"]
        deployed = await call_ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        pids = [n["pid"] for n in deployed["nodes"]]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        # Stop the front-end while this client still holds its session open.
        rc = http_server.stop(sig, timeout=60)
    assert rc == 0, http_server.stderr()
    assert all(pid_alive(p) for p in pids), f"a front-end's signal stopped nodes:\n{http_server.stderr()}"
    again = HttpServer(http_server.home, http_server.token).wait_ready()  # another front-end, same home
    try:
        async with http_client(again) as client:
            status = await call_ok(client, "neural_cluster_status", {"cluster_id": cid})
            assert sorted(n["pid"] for n in status["nodes"] if n["alive"]) == sorted(pids)
            await call_ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    finally:
        assert again.stop() == 0
    assert not any(pid_alive(p) for p in pids)


def test_loopback_without_a_token_gets_a_generated_one(home):
    """Loopback is shared by every local account: without a token the server makes one, 0600."""
    server = HttpServer(home, None).wait_ready()  # 127.0.0.1, FLOW_NEXUS_TOKEN unset
    try:
        anonymous = httpx.post(server.url, headers=MCP_HEADERS, content=json.dumps(INIT), timeout=30)
        assert anonymous.status_code == 401, anonymous.text
        token_file = home / "http-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        reply = httpx.post(server.url, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                           content=json.dumps(INIT), timeout=30)
        assert reply.status_code == 200, reply.text
        assert str(token_file) in server.stderr() and token not in server.stderr()
        assert token not in (home / "server.log").read_text()
    finally:
        assert server.stop() == 0
    again = HttpServer(home, None).wait_ready()  # a restart keeps the same token: clients keep working
    try:
        assert (home / "http-token").read_text().strip() == token
    finally:
        assert again.stop() == 0
