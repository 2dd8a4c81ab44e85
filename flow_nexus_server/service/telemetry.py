"""Node telemetry on the controller: the listener nodes push to, and what it keeps in memory.

Every node agent POSTs a ``TelemetryPush`` (its health and its job's progress) every second to
``<url>/telemetry/<cluster_id>/<node_id>`` (``workers.telemetry``). This module keeps, per node,
the time of its last push and its last ``HealthReply``, and hands the progress to whoever follows
training (``on_progress``); status, the monitor and metrics read this memory instead of calling
the nodes. A node with no push for ``NODE_SILENT_S`` is lost: the one liveness rule, applied by
the monitor alone (service.monitor).

The listener (``workers.http_server``: bounded threads, head time-outs, short JSON errors) checks
the cluster's token from the headers before it reads a body, and takes bodies up to
``MAX_PUSH_BYTES``. It listens on 127.0.0.1, or, when ``FLOW_NEXUS_ADVERTISE_HOST`` names an
address of this host for nodes on other machines, on that address; the port is
``FLOW_NEXUS_TELEMETRY_PORT`` or one the OS picks.
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from flow_nexus_server.service.rendezvous import ADVERTISE_ENV
from workers import protocol as p
from workers.http_server import BoundedHTTPServer, JSONRequestHandler, RequestError

log = logging.getLogger(__name__)

NODE_SILENT_S = 10.0  # a node that has not pushed for this long is lost (the one liveness rule)
MAX_PUSH_BYTES = 4 << 20  # a push holds at most 2,000 samples (workers.telemetry) and 50 log lines
LOOPBACK = "127.0.0.1"

# (cluster_id, node_id, progress, the cursor the node pushed from) -> the cursor to acknowledge,
# or None when no session follows that job.
ProgressHandler = Callable[[str, str, p.TrainProgress, int], "int | None"]


@dataclass(frozen=True)
class NodeReport:
    cluster_id: str
    seen: float  # time.time() of the last push (or of the controller's own health check)
    health: p.HealthReply


class Directory:
    """What the listener asks the cluster registry (ClusterService) before it takes a push."""

    def __init__(self, token_of: Callable[[str], str | None], is_live: Callable[[str, str], bool]) -> None:
        self.token_of = token_of  # cluster_id -> its token; None for an unknown or terminated cluster
        self.is_live = is_live  # (cluster_id, node_id) -> the node is one of the cluster's live nodes


class Telemetry:
    def __init__(self, directory: Directory, advertise_host: str | None = None, port: int = 0) -> None:
        self.directory = directory
        self.on_progress: ProgressHandler | None = None
        self._reports: dict[str, NodeReport] = {}
        self._lock = threading.Lock()
        host = advertise_host or LOOPBACK
        self._httpd = _listen(host, port, _handler(self))
        bound = self._httpd.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="telemetry-listener", daemon=True)
        self._thread.start()
        log.info("telemetry listener on %s", self.url)

    # ------------------------------------------------------------------ memory
    def record(self, cluster_id: str, health: p.HealthReply, at: float | None = None) -> None:
        """A node's health, pushed or read by the controller itself (deploy, re-attach)."""
        with self._lock:
            self._reports[health.node_id] = NodeReport(cluster_id, at or time.time(), health)

    def note_group(self, node_id: str, group: p.GroupInfo | None) -> None:
        """The group a node just joined (its join reply), so status shows it before the next push."""
        with self._lock:
            old = self._reports.get(node_id)
            if old is not None:
                self._reports[node_id] = NodeReport(old.cluster_id, old.seen,
                                                    old.health.model_copy(update={"group": group}))

    def report(self, node_id: str) -> NodeReport | None:
        return self._reports.get(node_id)

    def reports(self) -> dict[str, NodeReport]:
        with self._lock:
            return dict(self._reports)

    def forget(self, node_id: str) -> None:
        """The node is no longer live (lost, removed, stopped): its figures go."""
        with self._lock:
            self._reports.pop(node_id, None)

    @staticmethod
    def fresh(report: NodeReport | None, now: float) -> bool:
        """The node pushed within NODE_SILENT_S."""
        return report is not None and now - report.seen <= NODE_SILENT_S

    # ------------------------------------------------------------------ pushes
    def receive(self, cluster_id: str, node_id: str, push: p.TelemetryPush) -> p.TelemetryAck:
        if push.health.node_id != node_id:
            raise RequestError(400, f"the push names node {push.health.node_id} but was sent for node {node_id}")
        self.record(cluster_id, push.health)
        handler = self.on_progress
        cursor = handler(cluster_id, node_id, push.progress, push.cursor) if handler is not None else None
        if cursor is None:  # no session follows this job: its samples are not wanted
            cursor = push.progress.samples[-1].seq if push.progress.samples else push.cursor
        return p.TelemetryAck(cursor=cursor)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _IPv6Server(BoundedHTTPServer):
    address_family = socket.AF_INET6


def _listen(host: str, port: int, handler: type) -> BoundedHTTPServer:
    """The listening server on ``host`` (the advertised address's interface); when that address
    is not one of this host's (a NAT or proxy address), on every interface instead."""
    server = _IPv6Server if ":" in host else BoundedHTTPServer
    try:
        return server((host, port), handler)
    except OSError as exc:
        if host == LOOPBACK or exc.errno != errno.EADDRNOTAVAIL:
            raise RuntimeError(f"cannot listen for node telemetry on {host}:{port} ({exc.strerror or exc}); free "
                               "the port or set FLOW_NEXUS_TELEMETRY_PORT to another one (0: any)") from exc
        log.warning("%s is not an address of this host (%s); telemetry listens on all interfaces", host,
                    ADVERTISE_ENV)
        return server(("::" if ":" in host else "0.0.0.0", port), handler)


def _handler(telemetry: Telemetry) -> type:
    class Handler(JSONRequestHandler):
        max_body_bytes = MAX_PUSH_BYTES

        def respond(self, method: str) -> None:
            cluster_id, node_id = self._route(method)
            self._check_token(cluster_id)  # from the headers alone: an unauthenticated body is never read
            if not telemetry.directory.is_live(cluster_id, node_id):
                raise RequestError(404, f"node {node_id} is not a live node of cluster {cluster_id} on this "
                                        "controller")
            body = self.read_body(required=True)
            try:
                push = p.TelemetryPush.model_validate_json(body)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                raise RequestError(400, f"invalid telemetry push: {'.'.join(map(str, first['loc']))}: "
                                        f"{first['msg']}") from exc
            try:
                ack = telemetry.receive(cluster_id, node_id, push)
            except RequestError:
                raise
            except Exception as exc:
                log.exception("taking a telemetry push from %s failed", node_id)
                raise RequestError(500, "the controller failed to take this push; see its server.log") from exc
            self.reply_json(200, ack.model_dump())

        def _route(self, method: str) -> tuple[str, str]:
            path = self.path.partition("?")[0]
            prefix, _, rest = path.rpartition(p.TELEMETRY_PATH + "/")
            cluster_id, _, node_id = rest.partition("/")
            if method != "POST" or prefix or not cluster_id or not node_id or "/" in node_id:
                raise RequestError(404, f"no endpoint {method} {path[:100]}; nodes POST "
                                        f"{p.TELEMETRY_PATH}/<cluster_id>/<node_id>")
            return cluster_id, node_id

        def _check_token(self, cluster_id: str) -> None:
            token = telemetry.directory.token_of(cluster_id)
            given = self.headers.get("Authorization", "")
            if token is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise RequestError(401, "missing or wrong cluster token, or no such cluster on this controller")

    return Handler
