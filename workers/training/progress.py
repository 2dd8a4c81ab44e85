"""ProgressSink: what a node's training reports, read by the agent's HTTP thread while it runs.

Thread-safe: the training thread writes, any other thread takes :meth:`ProgressSink.snapshot`.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque

from workers.protocol import JobState, MetricSample, TrainProgress

log = logging.getLogger(__name__)

MAX_LOG_LINES = 50
MAX_SAMPLES = 200_000
"""Oldest samples are dropped beyond this (a cursor older than the oldest kept sample simply
gets everything still held)."""


class ProgressSink:
    """State, progress, metric time series, node statistics, checkpoints and log lines of one job."""

    def __init__(self, session_id: str, role: str, job: int = 0) -> None:
        self._lock = threading.Lock()
        self.session_id = session_id
        self.role = role
        self.job = job  # the agent's job number: which start of the session this is
        self._state = JobState.IDLE
        self._error: str | None = None
        self._reporter = False
        self._epoch = 0
        self._total_epochs = 0
        self._step = 0
        self._total_steps = 0
        self._latest: dict[str, float] = {}
        self._samples: list[MetricSample] = []
        self._seqs: list[int] = []
        self._seq = 0
        self._node_stats: dict[str, float] = {}
        self._checkpoints: list[str] = []
        self._rotated: list[str] = []  # written, then deleted by rotation (perhaps between two pushes)
        self._log: deque[str] = deque(maxlen=MAX_LOG_LINES)

    # ------------------------------------------------------------------ writers

    def set_state(self, state: JobState, error: str | None = None) -> None:
        with self._lock:
            self._state = JobState(state)
            if error is not None or state != JobState.FAILED:
                self._error = error
        log.info("[%s] state %s%s", self.session_id, state, f": {error}" if error else "")

    def set_reporter(self, flag: bool) -> None:
        with self._lock:
            self._reporter = bool(flag)

    def update(
        self,
        *,
        epoch: int | None = None,
        total_epochs: int | None = None,
        step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        with self._lock:
            if epoch is not None:
                self._epoch = int(epoch)
            if total_epochs is not None:
                self._total_epochs = int(total_epochs)
            if step is not None:
                self._step = int(step)
            if total_steps is not None:
                self._total_steps = int(total_steps)

    def record(self, name: str, value: float, *, epoch: int, step: int) -> None:
        """Append one metric sample (``seq`` increasing from 1) and set ``latest[name]``."""
        value = float(value)
        with self._lock:
            self._seq += 1
            self._samples.append(
                MetricSample(seq=self._seq, time=time.time(), epoch=int(epoch), step=int(step), name=name, value=value)
            )
            self._seqs.append(self._seq)
            if len(self._samples) > MAX_SAMPLES:
                drop = len(self._samples) - MAX_SAMPLES
                del self._samples[:drop]
                del self._seqs[:drop]
            self._latest[name] = value

    def node_stat(self, name: str, value: float) -> None:
        with self._lock:
            self._node_stats[name] = float(value)

    def add_checkpoint(self, path: str) -> None:
        with self._lock:
            if path not in self._checkpoints:
                self._checkpoints.append(path)

    def discard_checkpoint(self, path: str) -> None:
        """Forget a checkpoint file that was deleted (``max_checkpoints`` rotation)."""
        with self._lock:
            if path in self._checkpoints:
                self._checkpoints.remove(path)
                self._rotated.append(path)

    def log(self, line: str) -> None:
        """Keep the line (the last 50 are kept) and write it to this node's log."""
        with self._lock:
            self._log.append(line)
        log.info("[%s] %s", self.session_id, line)

    # ------------------------------------------------------------------ readers

    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    def latest(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latest)

    def node_stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._node_stats)

    def snapshot(self, cursor: int = 0) -> TrainProgress:
        """Everything so far; ``samples`` holds only the samples with ``seq > cursor``."""
        with self._lock:
            start = bisect.bisect_right(self._seqs, int(cursor))
            progress = self._step / self._total_steps if self._total_steps > 0 else 0.0
            return TrainProgress(
                session_id=self.session_id,
                job=self.job,
                state=self._state,
                role=self.role,
                reporter=self._reporter,
                epoch=self._epoch,
                total_epochs=self._total_epochs,
                step=self._step,
                total_steps=self._total_steps,
                progress=min(1.0, max(0.0, progress)),
                latest=dict(self._latest),
                samples=list(self._samples[start:]),
                node_stats=dict(self._node_stats),
                checkpoints=list(self._checkpoints),
                rotated_checkpoints=list(self._rotated),
                error=self._error,
                log_lines=list(self._log),
            )
