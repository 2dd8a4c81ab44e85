"""TensorBoard event files for every training session, written by the controller from pushed metrics.

``<home>/tensorboard/<session_id>/`` holds one run per session: the global metrics as scalars
per epoch (federated: per round; the epoch is the step), each worker's local loss under
``workers/<node_id>/local_loss``, and the session's options as hparams (the session summary at
its start, its end status at the end). ``tensorboard --logdir <home>/tensorboard`` shows every
run. The model graph is not written: the controller holds no model, and tracing one on a node
would cost a forward pass on data the controller must not see.

Directories are 0700 and files 0600 whatever the process umask (the home is private). A
failure to write is logged and ends that session's TensorBoard log only, never the session.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flow_nexus_server.home import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
HPARAM_KEYS = ("epochs", "rounds", "local_epochs", "batch_size", "learning_rate", "optimizer", "federated", "mode",
               "topology", "architecture", "model", "dataset")
HPARAM_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_perplexity")


def worker_tag(node_id: str, name: str) -> str:
    return f"workers/{node_id}/{name}"


class TensorBoardLog:
    """One event writer per running session, opened on its first write and closed at its end.

    Writes go through a queue to one writer thread: the telemetry listener and a training call
    never wait for a file, nor for the first import of TensorBoard's modules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writers: dict[str, Any] = {}
        self._broken: set[str] = set()
        self._finished: set[str] = set()  # a late push must not open a second file for an ended session
        self._unavailable: str | None = None
        self._queue: queue.Queue[tuple[str, Callable[[Any], object]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def session_dir(self, session_id: str) -> Path:
        return self.root / session_id

    def start(self, session_id: str, config: dict[str, Any]) -> None:
        """The session's hparams (its options), written when it starts."""
        hparams = {k: config[k] for k in HPARAM_KEYS if isinstance(config.get(k), (int, float, str, bool))}
        self._submit(session_id, lambda w: _add_hparams_start(w, hparams))

    def scalars(self, session_id: str, points: Iterable[tuple[str, int, float]]) -> None:
        """Global metrics: (name, epoch or round, value)."""
        points = list(points)
        if points:
            self._submit(session_id, lambda w: [w.add_scalar(name, value, epoch) for name, epoch, value in points])

    def worker_scalar(self, session_id: str, node_id: str, name: str, epoch: int, value: float) -> None:
        self._submit(session_id, lambda w: w.add_scalar(worker_tag(node_id, name), value, epoch))

    def finish(self, session_id: str, status: str) -> None:
        """The session ended: its hparams status, then its files are closed."""
        self._submit(session_id, lambda w: _add_hparams_end(w, status))
        self._submit(session_id, _CLOSE)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, close every file, stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    # ------------------------------------------------------------------ the writer thread
    def _submit(self, session_id: str, action: Callable[[Any], object]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tensorboard-writer", daemon=True)
                self._thread.start()
        self._queue.put((session_id, action))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            session_id, action = item
            if action is _CLOSE:
                self._close_session(session_id)
            else:
                self._write(session_id, action)
        for session_id in list(self._writers):
            self._close_session(session_id)

    def _write(self, session_id: str, action: Callable[[Any], object]) -> None:
        if session_id in self._broken or session_id in self._finished or self._unavailable:
            return
        try:
            writer = self._writers.get(session_id) or self._open(session_id)
            action(writer)
            writer.flush()
        except Exception:
            self._broken.add(session_id)
            log.exception("writing the TensorBoard log of session %s failed; it is not written further", session_id)

    def _close_session(self, session_id: str) -> None:
        self._finished.add(session_id)
        self._broken.discard(session_id)
        writer = self._writers.pop(session_id, None)
        if writer is None:
            return
        try:
            writer.close()
            self._make_private(session_id)
        except Exception:
            log.exception("closing the TensorBoard log of session %s failed", session_id)

    def _open(self, session_id: str) -> Any:
        try:
            from flow_nexus_server.service.tensorboard_events import EventWriter
        except ImportError as exc:  # tensorboard is a dependency; an odd install may lack it
            self._unavailable = str(exc)
            log.warning("no TensorBoard logs: %s (pip install 'tensorboard>=2.14')", exc)
            raise
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        path = self.session_dir(session_id)
        path.mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
        writer = EventWriter(str(path), flush_secs=5)
        self._writers[session_id] = writer
        self._make_private(session_id)
        return writer

    def _make_private(self, session_id: str) -> None:
        """The writer creates its file with the process umask: make it the owner's alone."""
        for top, _dirs, files in os.walk(self.session_dir(session_id)):
            os.chmod(top, PRIVATE_DIR_MODE)
            for name in files:
                os.chmod(os.path.join(top, name), PRIVATE_FILE_MODE)


def _close_marker(_writer: Any) -> None:
    """Queued by ``finish``: the writer thread closes the session's files when it gets here."""


_CLOSE = _close_marker


def _add_hparams_start(writer: Any, hparams: dict[str, Any]) -> None:
    writer.add_hparams_start(hparams, HPARAM_METRICS)


def _add_hparams_end(writer: Any, status: str) -> None:
    writer.add_hparams_end(status)
