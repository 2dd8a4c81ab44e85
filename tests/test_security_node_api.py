"""Issue 11, node side: the control API authenticates before it reads, bounds sizes, time and
threads, answers errors with short sentences; a node serves and loads only paths inside its
sandbox and the roots it was started with (symlinks, '..' and globs resolved first)."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time

import httpx
import psutil
import pytest

from flow_nexus_server.launchers import NodeSpec, SubprocessLauncher
from flow_nexus_server.launchers.docker import DockerLauncher
from flow_nexus_server.launchers.warm import WarmSubprocessLauncher
from workers import http_server, paths
from workers.agent import make_handler
from workers.data import DatasetError, load_dataset
from workers.http_server import BoundedHTTPServer

PYTHON_TEXT = ("Traceback", "invalid literal", "ValueError", "Error:", "File \"")


# ----------------------------------------------------------------------------- helpers

def rss_kb(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss // 1024


def thread_count(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def exchange(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], dict, bool]:
    """Send raw bytes, read one reply: (status, headers, JSON body, whether the node then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"the node closed the connection without a reply; got {buf!r}"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "the reply body was cut short"
            rest += chunk
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = False
        return status, headers, json.loads(rest[:length]), closed


def request(method: str, path: str, token: str | None, headers: dict[str, str] | None = None,
            body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_short_sentence(reply: dict) -> str:
    text = reply["error"]
    assert isinstance(text, str) and 10 < len(text) < 400, text
    assert not any(marker in text for marker in PYTHON_TEXT), text
    return text


# ----------------------------------------------------------------------------- a real node

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    token = secrets.token_hex(32)
    base = tmp_path_factory.mktemp("nodeapi")
    sandbox, root, outside = base / "sandbox", base / "root", base / "outside"
    for d in (sandbox, root, outside):
        d.mkdir()
    launcher = SubprocessLauncher()
    handle = launcher.launch(NodeSpec("node_secapi01", "dnc_sec", "worker", sandbox, token,
                                      allowed_roots=(root,)), timeout_s=60)
    yield {"port": handle.port, "pid": handle.pid, "token": token, "sandbox": sandbox, "root": root,
           "outside": outside}
    launcher.terminate(handle, grace_s=2)


def health(node) -> int:
    return httpx.get(f"http://127.0.0.1:{node['port']}/health",
                     headers={"Authorization": f"Bearer {node['token']}"}, timeout=30).status_code


def post(node, path: str, payload: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{node['port']}{path}", json=payload,
                      headers={"Authorization": f"Bearer {node['token']}"}, timeout=60)


def test_an_unauthenticated_200_mb_body_is_refused_before_it_is_read(node):
    before = rss_kb(node["pid"])
    data = request("POST", "/model/load", None, {"Content-Length": str(200_000_000)}, b"x" * 65536)
    status, headers, reply, closed = exchange(node["port"], data, timeout=30)
    assert status == 401 and "token" in assert_short_sentence(reply)
    assert headers.get("connection") == "close" and closed, "the unread body must end the connection"
    assert rss_kb(node["pid"]) - before < 8 * 1024, "the node must not buffer an unauthenticated body"
    assert health(node) == 200


@pytest.mark.parametrize(("headers", "path", "status", "words"), [
    ({"Content-Length": "-1"}, "/predict", 400, "non-negative"),
    ({"Content-Length": "abc"}, "/predict", 400, "non-negative"),
    ({"Content-Length": "+5"}, "/predict", 400, "non-negative"),
    ({}, "/predict", 411, "Content-Length"),
    ({"Content-Length": str(1 << 30)}, "/predict", 413, "limit"),
    ({"Transfer-Encoding": "chunked"}, "/predict", 411, "Content-Length"),
    ({"Content-Length": "2", "content-length": "3"}, "/predict", 400, "more than one"),
])
def test_bad_framing_gets_a_short_4xx_sentence(node, headers, path, status, words):
    got, _, reply, closed = exchange(node["port"], request("POST", path, node["token"], headers))
    assert got == status and words in assert_short_sentence(reply)
    assert closed, "a body that was not read ends the connection"


def test_bad_framing_without_the_token_is_a_401(node):
    for value in ("-1", "abc"):
        got, _, reply, _ = exchange(node["port"], request("POST", "/predict", None, {"Content-Length": value}))
        assert got == 401 and "token" in assert_short_sentence(reply)


def test_a_body_route_without_body_length_but_no_body_route_is_fine(node):
    got, _, reply, _ = exchange(node["port"], request("POST", "/train/stop", node["token"]))
    assert got == 200 and reply["state"] == "idle"


def test_unknown_methods_and_garbage_get_json(node):
    got, _, reply, closed = exchange(node["port"], request("DELETE", "/health", node["token"]))
    assert got == 501 and assert_short_sentence(reply) and closed
    got, _, reply, closed = exchange(node["port"], b"GARBAGE\r\n\r\n")
    assert got == 400 and reply["error"] and closed


def test_idle_and_slow_connections_hold_no_threads(node):
    assert health(node) == 200
    before = thread_count(node["pid"])
    socks = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", node["port"]), timeout=10)
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            socks.append(s)
        time.sleep(1.0)  # let the node accept them all
        during = thread_count(node["pid"])
        assert health(node) == 200, "a client with the token is answered while 300 connections wait"
        assert during - before < 10, f"{during - before} threads for 300 idle connections"
        assert thread_count(node["pid"]) < before + 10
    finally:
        for s in socks:
            s.close()
    assert health(node) == 200


# ----------------------------------------------------------------------------- paths on the node

def test_load_model_outside_the_sandbox_and_roots_is_refused(node):
    secret = node["outside"] / "model.pt"
    secret.write_bytes(b"not a model")
    r = post(node, "/model/load", {"path": str(secret)})
    assert r.status_code == 403 and "outside this node's sandbox and allowed roots" in r.json()["error"]
    (node["sandbox"] / "link.pt").symlink_to(secret)
    r = post(node, "/model/load", {"path": "link.pt"})
    assert r.status_code == 403 and "leads out of this node's sandbox" in r.json()["error"]
    r = post(node, "/model/load", {"path": str(node["root"] / "missing.pt")})  # allowed: fails on its own terms
    assert r.status_code != 403 and "outside" not in r.json()["error"]


def test_a_training_job_cannot_name_files_outside(node):
    (node["outside"] / "secret.csv").write_text("a,label\n1,x\n2,y\n3,x\n4,y\n")
    (node["sandbox"] / "x").symlink_to(node["outside"])
    job = {"session_id": "s", "mode": "sync", "topology": "mesh", "architecture": "mlp", "roles": ["worker"]}
    r = post(node, "/train/validate", {**job, "dataset": "x/secret.csv"})
    assert r.status_code == 200 and not r.json()["ok"] and "leads out of this node's sandbox" in r.json()["error"]
    r = post(node, "/train/validate", {**job, "dataset": f"{node['root']}/../outside/*.csv"})
    assert not r.json()["ok"] and "outside" in r.json()["error"] and "secret" not in r.json()["error"]
    for field in ("resume_from", "checkpoint_dir"):
        r = post(node, "/train/validate", {**job, "dataset": "digits", field: str(node["outside"])})
        assert r.status_code == 403 and field in r.json()["error"]


# ----------------------------------------------------------------------------- 500s, in process

class BrokenAgent:
    node_id = "node_broken1"

    def health(self) -> dict:
        return {"node_id": self.node_id}

    def leave(self) -> dict:
        time.sleep(1.5)  # longer than the (shortened) idle timeout: the handler's work is not cut
        return {"left": True}

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise RuntimeError("secret internal detail /srv/private/path")
        return fail


@pytest.fixture
def stub_server():
    token = "t" * 64
    httpd = BoundedHTTPServer(("127.0.0.1", 0), make_handler(BrokenAgent(), token, lambda: None))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.server_address[1], token
    httpd.shutdown()
    httpd.server_close()


def test_a_handler_exception_is_a_short_500_sentence_and_a_logged_traceback(stub_server, caplog):
    port, token = stub_server
    with caplog.at_level(logging.ERROR):
        r = httpx.post(f"http://127.0.0.1:{port}/train/stop", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error on node node_broken1 while handling POST /train/stop; "
                                 "see the node's log (neural_node_logs)"}
    assert any(rec.exc_info and "secret internal detail" in str(rec.exc_info[1]) for rec in caplog.records)


def test_keep_alive_and_expect_continue(stub_server):
    port, token = stub_server
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(5):  # one connection, handed back to the watcher between requests
            assert client.get(f"http://127.0.0.1:{port}/health").json() == {"node_id": "node_broken1"}
    data = request("POST", "/predict", None, {"Content-Length": "10", "Expect": "100-continue"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 401"), "no 100 Continue before the token is checked"


def test_idle_connections_are_closed_but_slow_handlers_are_not(stub_server, monkeypatch):
    port, token = stub_server
    monkeypatch.setattr(http_server, "IDLE_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # never finished
        assert sock.recv(1) == b"", "the node closes a connection whose request head does not arrive"
    r = httpx.post(f"http://127.0.0.1:{port}/leave", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"left": True}


# ----------------------------------------------------------------------------- workers.paths, workers.data

@pytest.fixture
def tree(tmp_path, monkeypatch):
    """home/clusters/c/nodes/n is the sandbox, home an allowed root, outside/secret.csv outside both."""
    home = tmp_path / "home"
    sandbox = home / "clusters" / "c" / "nodes" / "n"
    sandbox.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("a,label\n1,x\n2,y\n")
    (home / "shared.csv").write_text("a,label\n1,x\n2,y\n")
    (sandbox / "mine.csv").write_text("a,label\n1,x\n2,y\n")
    monkeypatch.setattr(paths, "ALLOWED", paths.Roots(sandbox.resolve(), (home.resolve(),)))
    return home, sandbox, outside


def test_relative_paths_stay_in_the_sandbox_even_through_symlinks(tree):
    home, sandbox, outside = tree
    (sandbox / "x").symlink_to("/etc")
    (sandbox / "up").symlink_to(home)  # into an allowed root, but relative paths are the sandbox's
    for spec in ("x/passwd", "up/shared.csv", "../../../../shared.csv"):
        with pytest.raises(DatasetError, match="leads out of this node's sandbox"):
            load_dataset(spec, sandbox)
    assert len(load_dataset("mine.csv", sandbox)) == 2
    assert len(load_dataset(str(home / "shared.csv"), sandbox)) == 2  # absolute, inside a root


def test_globs_are_checked_file_by_file_after_expansion(tree):
    home, sandbox, outside = tree
    (sandbox / "d").mkdir()
    for spec in (f"{home}/*/../../outside/secret.csv", "*/../../../../../../outside/*.csv"):
        with pytest.raises(DatasetError, match="matches a file that resolves outside") as err:
            load_dataset(spec, sandbox)
        assert str(err.value).count("secret") == spec.count("secret"), "the refusal must not list what lies outside"
    (sandbox / "shards").mkdir()
    (sandbox / "shards" / "a.csv").write_text("a,label\n1,x\n2,y\n")
    (sandbox / "shards" / "b.csv").symlink_to(outside / "secret.csv")
    with pytest.raises(DatasetError, match="outside this node's sandbox"):
        load_dataset("shards/*.csv", sandbox)
    with pytest.raises(DatasetError, match="out of this node's sandbox"):
        load_dataset("shards", sandbox)  # a directory: each file is checked
    with pytest.raises(DatasetError, match="outside this node's sandbox and allowed roots"):
        load_dataset("/**/secret.csv", sandbox)  # refused before it walks the file system
    (sandbox / "shards" / "b.csv").unlink()
    assert len(load_dataset("shards/*.csv", sandbox)) == 2


def test_confine_resolves_before_it_decides(tree):
    home, sandbox, outside = tree
    assert paths.confine("mine.csv") == (sandbox / "mine.csv").resolve()
    assert paths.confine(str(home / "exports" / "new")) == (home / "exports" / "new").resolve()
    for bad in (str(outside), f"{home}/../outside", "/etc/passwd", f"{sandbox}/mine.csv\0"):
        with pytest.raises(paths.PathRefused):
            paths.confine(bad, what="export destination")
    (home / "esc").symlink_to(outside)
    with pytest.raises(paths.PathRefused, match="export destination"):
        paths.confine(str(home / "esc" / "new"), what="export destination")


def test_library_use_without_a_sandbox_is_not_confined(tmp_path):
    assert paths.ALLOWED.sandbox is None
    (tmp_path / "plain.csv").write_text("a,label\n1,x\n2,y\n")
    assert len(load_dataset(str(tmp_path / "plain.csv"))) == 2


# ----------------------------------------------------------------------------- launchers pass the roots

def test_launchers_put_the_roots_on_the_agent_command_line(tmp_path):
    roots = (tmp_path / "a", tmp_path / "b")
    spec = NodeSpec("node_x", "dnc_x", "worker", tmp_path / "s", "t" * 64, allowed_roots=roots)
    argv = SubprocessLauncher().command(spec)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--allowed-root"] == [str(r) for r in roots]
    assert "--allowed-root" not in DockerLauncher().run_command(spec), "a container sees its sandbox only"


def test_a_warm_node_gets_its_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    token = secrets.token_hex(32)
    with WarmSubprocessLauncher(tmp_path / "state") as launcher:
        handle = launcher.launch(NodeSpec("node_warmroot", "dnc_w", "worker", tmp_path / "s", token,
                                          allowed_roots=(root,)), timeout_s=90)
        try:
            assert "@" in handle.ref, "the node was forked by the spawner"  # "<pid>@<create time>"
            node = {"port": handle.port, "token": token}
            assert post(node, "/model/load", {"path": str(outside / "m.pt")}).status_code == 403
            assert post(node, "/model/load", {"path": str(root / "m.pt")}).status_code != 403
        finally:
            launcher.terminate(handle, grace_s=2)
