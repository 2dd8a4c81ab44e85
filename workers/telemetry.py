"""The node's heartbeat to its controller, and its lease on that controller.

Every ``PUSH_INTERVAL_S`` a small thread POSTs a ``TelemetryPush`` (the node's health and its
job's progress: the metric samples after the cursor the controller last acknowledged) to
``<controller_url>/telemetry/<cluster_id>/<node_id>``, with the cluster token as bearer. The
controller answers with the cursor the next push starts from, so a new controller (after a
restart) rewinds it to what its database holds.

The lease: when pushes have failed for longer than the grace period (``FLOW_NEXUS_LEASE_GRACE_S``,
default 120 s) while no job is preparing or running, the node stops itself, so a controller that
never comes back leaves nothing behind. A running job goes on (training must not depend on the
controller); the grace counts again from the job's end. ``POST /lease`` points a live node at a
new controller.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from workers import api
from workers import protocol as p

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0
GRACE_ENV = "FLOW_NEXUS_LEASE_GRACE_S"
DEFAULT_GRACE_S = 120.0
MAX_PUSH_SAMPLES = 2000  # a push stays small; the rest follows in the next pushes
FAILURE_LOG_EVERY_S = 30.0  # a controller that is gone is said once, then now and then


def lease_grace_s() -> float:
    """FLOW_NEXUS_LEASE_GRACE_S from the environment (seconds), else the default."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_GRACE_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.0f", GRACE_ENV, raw, DEFAULT_GRACE_S)
        return DEFAULT_GRACE_S


class Reporting(Protocol):
    """What the pusher reads from the node agent."""

    def health(self) -> p.HealthReply: ...

    def training_status(self, cursor: int = 0) -> p.TrainProgress: ...


class TelemetryPusher:
    def __init__(self, agent: Reporting, cluster_id: str, node_id: str, token: str,
                 on_expired: Callable[[str], None], grace_s: float | None = None) -> None:
        self.agent = agent
        self.path = api.TELEMETRY.path.format(cluster_id=cluster_id, node_id=node_id)
        self.token = token
        self.on_expired = on_expired
        self.grace_s = lease_grace_s() if grace_s is None else grace_s
        self.controller_url: str | None = None
        self._job, self._cursor = 0, 0  # the job the cursor belongs to, and the acknowledged cursor
        self._conn: http.client.HTTPConnection | None = None
        self._lease_since = time.monotonic()  # last success, or the end of the last job
        self._failing_since: float | None = None
        self._last_failure_log = 0.0
        self._lock = threading.Lock()  # controller_url and the connection change together
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def point_to(self, controller_url: str) -> None:
        """Push to this controller from now on; the lease starts afresh. Starts the thread once."""
        with self._lock:
            changed = controller_url != self.controller_url
            self.controller_url = controller_url
            if changed:
                self._close()
            self._lease_since = time.monotonic()
        if changed:
            log.info("pushing telemetry to %s every %.0f s; without it for %.0f s while idle, this node stops",
                     controller_url, PUSH_INTERVAL_S, self.grace_s)
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._close()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                self.push_once()
            except Exception:  # the heartbeat must outlive any one bad pass
                log.exception("a telemetry pass failed; the next one follows in %.0f s", PUSH_INTERVAL_S)

    def push_once(self) -> None:
        """One push; then the lease check (a failed push while idle past the grace ends the node)."""
        progress = self._progress()
        push = p.TelemetryPush(health=self.agent.health(), progress=progress, cursor=self._cursor)
        error = self._send(push)
        now = time.monotonic()
        if error is None or progress.state in p.BUSY_JOB_STATES:
            self._lease_since = now  # a running job keeps the node: the grace counts from its end
        if error is None:
            if self._failing_since is not None:
                log.info("telemetry reaches %s again", self.controller_url)
            self._failing_since = None
            return
        self._failing_since = self._failing_since or now
        if now - self._last_failure_log >= FAILURE_LOG_EVERY_S:
            self._last_failure_log = now
            log.warning("telemetry push to %s failed for %.0f s (%s)", self.controller_url,
                        now - self._failing_since, error)
        if now - self._lease_since > self.grace_s and not self._stop.is_set():
            self._stop.set()
            self.on_expired(f"its controller at {self.controller_url} has not taken a push for "
                            f"{now - self._failing_since:.0f} s and no job is running (lease grace "
                            f"{self.grace_s:.0f} s, {GRACE_ENV})")

    def _progress(self) -> p.TrainProgress:
        """The current job's progress, samples after the acknowledged cursor (from 0 for a new job)."""
        progress = self.agent.training_status(self._cursor)
        if progress.job != self._job:
            self._job, self._cursor = progress.job, 0
            progress = self.agent.training_status(0)
        if len(progress.samples) > MAX_PUSH_SAMPLES:
            progress.samples = progress.samples[:MAX_PUSH_SAMPLES]
        return progress

    # ------------------------------------------------------------------ HTTP
    def _send(self, push: p.TelemetryPush) -> str | None:
        """POST the push; None on success (the cursor moves to the acknowledged one), else why not."""
        body = push.model_dump_json().encode()
        with self._lock:
            if self.controller_url is None:
                return "no controller URL"
            for attempt in (1, 2):  # a kept-alive connection the controller closed: once more, afresh
                fresh = self._conn is None
                try:
                    status, data = self._post(body)
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self._close()
                    if fresh or attempt == 2:
                        return f"{type(exc).__name__}: {exc}"
        if status != 200:
            return f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
        try:
            ack = p.TelemetryAck.model_validate_json(data)
        except ValueError as exc:
            return f"the answer is not a TelemetryAck ({exc})"
        self._cursor = ack.cursor
        return None

    def _post(self, body: bytes) -> tuple[int, bytes]:
        if self._conn is None:
            url = urlsplit(self.controller_url)
            self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80,
                                                    timeout=api.TELEMETRY.timeout_for(None))
        self._conn.request("POST", self.path, body=body, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        reply = self._conn.getresponse()
        return reply.status, reply.read()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
