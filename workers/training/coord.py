"""Coordination between the ranks of one training job.

* :func:`agree` -- every rank reports its local outcome (an error or a payload) with one
  :func:`all_gather_json`; when any rank failed, every rank raises the same error (the one of
  the lowest failing rank), so nobody is left waiting in a collective.
* :class:`Coordinator` -- waits that may last longer than the process group's timeout
  (a federated aggregator waiting while workers train a round, ranks without a part in the
  job waiting for the end) are done by polling the rendezvous store (hosted by the cluster's
  first node, so these waits outlive the controller) instead of blocking in a gloo
  collective. Every rank that takes part writes a heartbeat counter; a waiter gives up when a
  rank it waits for stops beating. Messages may travel the same way (:meth:`Coordinator.post`,
  :meth:`Coordinator.collect`): a rank that dies then costs a timeout, not the whole group, which
  is what secure aggregation's dropout recovery needs.
* :func:`pg_timeout` / :func:`new_group` -- sub-groups get the default group's timeout
  (``dist.new_group`` otherwise uses the 30-minute gloo default).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from workers.aggregation import AggregationError
from workers.data import DatasetError
from workers.models import ModelError

from .common import TrainingError

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 1.0
STALE_AFTER_S = 45.0
"""A rank whose heartbeat has not moved for this long is considered dead (the heartbeat
comes from a background thread, so long computations do not delay it)."""
STOP_GRACE_S = 30.0
"""A rank asked to stop gives up waiting for its peers this long after the request."""

_ERRORS: dict[str, type[Exception]] = {
    "DatasetError": DatasetError,
    "ModelError": ModelError,
    "AggregationError": AggregationError,
    "TrainingError": TrainingError,
}


def pg_timeout(default: float = 60.0) -> timedelta:
    """The default process group's collective timeout."""
    try:
        pg = c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # other backends / torch versions: a safe fixed value
        return timedelta(seconds=default)


def new_group(ranks: list[int]) -> Any:
    """``dist.new_group`` with the default group's timeout; call on every rank, same order."""
    return dist.new_group(sorted(ranks), timeout=pg_timeout())


def destroy_group(group: Any) -> None:
    if group is None or group is dist.GroupMember.NON_GROUP_MEMBER or group is dist.GroupMember.WORLD:
        return
    try:
        dist.destroy_process_group(group)
    except Exception:  # already gone, or a broken group: nothing more to free
        log.debug("destroying a sub-group failed", exc_info=True)


def error_of(exc: BaseException) -> tuple[str, str]:
    """(class name, message) of an exception, for :func:`agree`."""
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "TrainingError"
    msg = str(exc) if str(exc) else type(exc).__name__
    if name == "TrainingError" and not isinstance(exc, (TrainingError, ValueError)):
        msg = f"{type(exc).__name__}: {msg}"
    return name, msg


def raise_error(name: str, message: str) -> None:
    raise _ERRORS.get(name, TrainingError)(message)


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} cannot be sent between ranks as JSON")


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """``all_gather_object`` without pickle: every rank's ``obj`` as JSON, in group-rank order.

    What arrives from a peer is parsed, never unpickled: torch's object collectives unpickle
    whatever a peer sends, and the rendezvous store that introduces peers has no
    authentication. Tuples arrive as lists; dict keys as strings.
    """
    data = torch.frombuffer(bytearray(json.dumps(obj, default=_to_json).encode()), dtype=torch.uint8)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(part[: int(size)].numpy().tobytes()) for part, size in zip(parts, sizes)]


def agree(error: tuple[str, str] | None, payload: Any, group: Any = None) -> list[Any]:
    """All-gather ``(error, payload)``; raise the lowest failing rank's error on every rank.

    Returns the payloads in group-rank order (JSON values: see :func:`all_gather_json`).
    """
    items = all_gather_json([error, payload], group)
    for rank, (err, _) in enumerate(items):
        if err is not None:
            if error is None:
                log.info("rank %d reported a failure: %s", rank, err[1])
            raise_error(*err)
    return [p for _, p in items]


class Coordinator:
    """Store-based waits with heartbeats, namespaced by a per-job ``nonce``.

    A daemon thread bumps this rank's heartbeat counter every second until :meth:`close`
    (the c10d TCPStore client serialises its operations, so the thread may share it).
    """

    def __init__(self, nonce: str, rank: int, stop: threading.Event, store: Any = None) -> None:
        self.store = store if store is not None else c10d._get_default_store()
        self.prefix = f"flow-nexus/train/{nonce}"
        self.rank = rank
        self.stop = stop
        self._beats = 0
        self._meetings: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _key(self, *parts: Any) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _beat_loop(self) -> None:
        while not self._closed.wait(HEARTBEAT_EVERY_S):
            self.beat()

    def beat(self) -> None:
        """Show that this rank is alive."""
        with self._lock:
            self._beats += 1
            n = self._beats
        try:
            self.store.set(self._key("hb", self.rank), str(n))
        except Exception:  # the store host is gone; collectives will tell the real story
            log.debug("heartbeat failed", exc_info=True)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poll(self, what: str, ranks: list[int], done: Any, watch: list[int] | None = None,
              all_stale: bool = False, patient: bool = False) -> Any:
        """Poll ``done()`` until it returns something other than None.

        ``watch``: ranks whose heartbeats must keep moving (by default those in ``ranks``
        that ``done`` has not seen yet); with ``all_stale`` it gives up only when all of them
        are stale. ``patient``: a stop request does not end the wait (the awaited ranks finish
        their work and arrive with the stop flag); only stale heartbeats do.
        """
        seen: dict[int, tuple[str | None, float]] = {}
        stop_since: float | None = None
        delay = 0.005
        while True:
            result = done()
            if result is not None:
                return result
            now = time.monotonic()
            watched = watch if watch is not None else ranks
            stale = []
            for r in watched:
                if self._silent_for(r, seen, now) > STALE_AFTER_S:
                    stale.append(r)
            if stale and (not all_stale or len(stale) == len(watched)):
                raise TrainingError(
                    f"{what}: rank(s) {stale} showed no sign of life for {STALE_AFTER_S:.0f} s "
                    "(process dead or hung); the job cannot continue"
                )
            if self.stop.is_set() and not patient:
                stop_since = stop_since or now
                if now - stop_since > STOP_GRACE_S:
                    raise TrainingError(f"{what}: stopped while waiting for ranks {watched}")
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)

    def _silent_for(self, r: int, seen: dict[int, tuple[str | None, float]], now: float) -> float:
        """Seconds rank ``r``'s heartbeat has not moved, as this waiter has watched it (``seen``)."""
        try:
            key = self._key("hb", r)
            value = self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:
            value = None
        last = seen.get(r)
        if last is None or last[0] != value:
            seen[r] = (value, now)
            return 0.0
        return now - last[1]

    # ------------------------------------------------------------------ messages

    def post(self, name: str, data: bytes) -> None:
        """This rank's message ``name`` (read by :meth:`collect` / :meth:`wait_for`)."""
        self.store.set(self._key("msg", name, self.rank), data)

    def wait_for(self, name: str, sender: int) -> bytes:
        """``sender``'s message ``name``, once it is there (a dead sender: TrainingError)."""
        key = self._key("msg", name, sender)

        def done() -> bytes | None:
            return bytes(self.store.get(key)) if self.store.check([key]) else None

        return self._poll(f"waiting for rank {sender}'s {name}", [sender], done, watch=[sender])

    def collect(self, name: str, ranks: list[int], dropout_after_s: float, keep: bool = False) -> dict[int, bytes]:
        """The message ``name`` of every rank in ``ranks`` that sent it; a rank whose heartbeat stood
        still for ``dropout_after_s`` before it sent is left out (it dropped out). Waits as long as
        a missing rank is alive; each message is deleted from the store once read, unless ``keep``
        (others read it too: then :meth:`forget` it)."""
        got: dict[int, bytes] = {}
        seen: dict[int, tuple[str | None, float]] = {}
        dropped: set[int] = set()
        stop_since: float | None = None
        delay = 0.005
        while True:
            for r in ranks:
                key = self._key("msg", name, r)
                if r not in got and r not in dropped and self.store.check([key]):
                    got[r] = bytes(self.store.get(key))
                    if not keep:
                        self.store.delete_key(key)
            now = time.monotonic()
            dropped |= {r for r in ranks if r not in got and self._silent_for(r, seen, now) > dropout_after_s}
            if len(got) + len(dropped) == len(ranks):
                return got
            if self.stop.is_set():
                stop_since = stop_since or now
                if now - stop_since > STOP_GRACE_S:
                    raise TrainingError(f"stopped while waiting for the {name} of ranks "
                                        f"{sorted(set(ranks) - set(got) - dropped)}")
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)

    def forget(self, name: str, ranks: list[int]) -> None:
        """Delete the message ``name`` of ``ranks`` from the store (read by everyone who needed it)."""
        for r in ranks:
            try:
                self.store.delete_key(self._key("msg", name, r))
            except Exception:  # already gone, or the store host is: nothing to free
                log.debug("deleting a message failed", exc_info=True)

    def barrier(self, name: str, ranks: list[int], patient: bool = False) -> None:
        """Wait until every rank in ``ranks`` arrived (no process-group timeout applies); ``patient``:
        see :meth:`_poll`."""
        key = self._key("bar", name)
        self.store.set(f"{key}/{self.rank}", "1")

        def done() -> bool | None:
            missing = [r for r in ranks if not self.store.check([f"{key}/{r}"])]
            pending[:] = missing
            return True if not missing else None

        pending: list[int] = list(ranks)
        self._poll(f"waiting for ranks at '{name}'", ranks, done, watch=pending, patient=patient)

    def meet(self, group: Any) -> None:
        """A store barrier over ``group``'s ranks before a collective that follows uneven work (a judge
        evaluating the whole validation split while workers evaluate their parts): a long evaluation on a
        busy host must not time the collective out. Every rank of the group calls it the same number
        of times, so the per-group count names the same barrier everywhere."""
        ranks = tuple(sorted(dist.get_process_group_ranks(group)))
        n = self._meetings[ranks] = self._meetings.get(ranks, 0) + 1
        self.barrier(f"meet-{'.'.join(map(str, ranks))}-{n}", list(ranks))

    def set_done(self, status: str) -> None:
        """Publish the job's outcome for ranks without a part in it: completed | stopped | failed: ..."""
        try:
            self.store.set(self._key("done"), status)
        except Exception:
            log.warning("could not publish the job outcome", exc_info=True)

    def wait_done(self, active: list[int]) -> str:
        key = self._key("done")

        def done() -> str | None:
            if self.store.check([key]):
                return self.store.get(key).decode()
            return None

        return self._poll("waiting for the training ranks", active, done, watch=active, all_stale=True)
