"""The node agent: a long-lived process with an HTTP control API on loopback.

Started by a launcher as ``python -m workers.agent --node-id ... --sandbox DIR``, with the
cluster token in the environment (``FLOW_NEXUS_NODE_TOKEN``), never on the command line.
Once listening it writes ``agent.json`` (port, pid) into its sandbox so the launcher can
find it. Every request must carry ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from workers import protocol as p

log = logging.getLogger("workers.agent")


class RequestError(Exception):
    """An error reply: HTTP status plus a sentence for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def rss_bytes() -> int:
    """Resident set size of this process, read now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best portable figure
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class NodeAgent:
    """State and operations of one node; knows nothing of HTTP."""

    def __init__(self, node_id: str, cluster_id: str, role: p.Role, sandbox: Path, threads: int) -> None:
        import torch  # imported here so `--help` stays fast

        from workers.group import Membership

        torch.set_num_threads(threads)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.role = role
        self.sandbox = sandbox
        self.started = time.time()
        self.membership = Membership()
        # One thread runs every torch.distributed call, so collectives never interleave.
        self.dist_thread = ThreadPoolExecutor(1, thread_name_prefix="dist")
        self.stopping = threading.Event()

    def health(self) -> p.HealthReply:
        import torch

        return p.HealthReply(
            node_id=self.node_id,
            cluster_id=self.cluster_id,
            role=self.role,
            pid=os.getpid(),
            rss_bytes=rss_bytes(),
            uptime_s=time.time() - self.started,
            torch_threads=torch.get_num_threads(),
            group=self.membership.info,
            time=time.time(),
        )

    def join(self, req: p.JoinRequest) -> p.JoinReply:
        ms = self._on_dist_thread(lambda: self.membership.join(req), req.timeout_s * 2)
        assert self.membership.info is not None
        return p.JoinReply(group=self.membership.info, join_ms=ms)

    def probe(self, req: p.ProbeRequest) -> p.ProbeReply:
        from workers.group import probe_edges

        def run() -> list[p.EdgeMeasurement]:
            return probe_edges(self.membership.require(req.generation), req)

        return p.ProbeReply(edges=self._on_dist_thread(run, 120))

    def leave(self) -> dict[str, Any]:
        self._on_dist_thread(self.membership.leave, 30)
        return {"left": True}

    def _on_dist_thread(self, fn: Callable[[], Any], timeout: float) -> Any:
        from workers.group import GroupError

        future = self.dist_thread.submit(fn)
        try:
            return future.result(timeout=timeout)
        except GroupError as exc:
            raise RequestError(409, str(exc)) from exc
        except TimeoutError as exc:
            raise RequestError(504, f"the operation did not finish within {timeout:.0f} s") from exc

    def close(self) -> None:
        self.stopping.set()
        try:
            self.dist_thread.submit(self.membership.leave).result(timeout=10)
        except Exception:
            log.warning("leaving the process group at shutdown failed", exc_info=True)
        self.dist_thread.shutdown(wait=False, cancel_futures=True)


Route = tuple[type[BaseModel] | None, Callable[..., Any]]


def make_handler(agent: NodeAgent, token: str, on_shutdown: Callable[[], None]) -> type:
    routes: dict[tuple[str, str], Route] = {
        ("GET", "/health"): (None, agent.health),
        ("POST", "/join"): (p.JoinRequest, agent.join),
        ("POST", "/probe"): (p.ProbeRequest, agent.probe),
        ("POST", "/leave"): (None, agent.leave),
        ("POST", "/shutdown"): (None, lambda: (on_shutdown(), {"stopping": True})[1]),
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            try:
                body = self._read_body()
                self._check_token()
                route = routes.get((method, self.path.split("?")[0]))
                if route is None:
                    raise RequestError(404, f"no endpoint {method} {self.path}")
                model, fn = route
                result = fn(model.model_validate_json(body or b"{}")) if model else fn()
                payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
                self._reply(200, payload)
            except RequestError as exc:
                self._reply(exc.status, {"error": str(exc)})
            except ValidationError as exc:
                self._reply(400, {"error": f"invalid request: {exc.errors(include_url=False)}"})
            except Exception as exc:
                log.exception("request %s %s failed", method, self.path)
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 64 << 20:
                raise RequestError(413, "request body over 64 MiB")
            return self.rfile.read(length) if length else b""

        def _check_token(self) -> None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise RequestError(401, "missing or wrong cluster token")

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler


def write_ready_file(sandbox: Path, port: int) -> None:
    tmp = sandbox / (p.READY_FILE + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    tmp.replace(sandbox / p.READY_FILE)  # atomic: the launcher never reads half a file


def serve(args: argparse.Namespace) -> int:
    token = os.environ.get(p.TOKEN_ENV)
    if not token:
        log.error("no cluster token: set %s in the environment", p.TOKEN_ENV)
        return 2
    os.environ.pop(p.TOKEN_ENV, None)  # child processes need not inherit it
    sandbox = Path(args.sandbox).resolve()
    sandbox.mkdir(parents=True, exist_ok=True)
    agent = NodeAgent(args.node_id, args.cluster_id, args.role, sandbox, args.threads)
    httpd: ThreadingHTTPServer | None = None

    def shutdown() -> None:
        # Answer the current request first, then stop serving from another thread.
        threading.Thread(target=lambda: httpd and httpd.shutdown(), daemon=True).start()

    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(agent, token, shutdown))
    httpd.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: shutdown())
    write_ready_file(sandbox, httpd.server_address[1])
    log.info(
        "node %s (%s) of cluster %s listening on %s:%d, pid %d",
        args.node_id, args.role, args.cluster_id, args.host, httpd.server_address[1], os.getpid(),
    )
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        agent.close()
        httpd.server_close()
        log.info("node %s stopped", args.node_id)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.agent", description=__doc__)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--cluster-id", required=True)
    ap.add_argument("--role", default="worker", choices=["worker", "parameter_server", "aggregator", "validator"])
    ap.add_argument("--sandbox", required=True, help="the node's own directory: data, checkpoints, log")
    ap.add_argument("--host", default="127.0.0.1", help="address of the control API (loopback by default)")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per co-located node)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
