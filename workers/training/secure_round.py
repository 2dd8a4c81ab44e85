"""One secure-aggregation instance per federated round (:mod:`workers.secagg`), carried over the
rendezvous store so that a worker dying mid-round is recovered instead of breaking the round.

Why the store and not gloo: a gloo collective with a dead peer fails on every rank, so one worker
lost mid-round would end the round for all. Messages posted to the store (the first node's
TCPStore, :meth:`.coord.Coordinator.post`) are read by whoever is alive, and the aggregator tells a
dead worker from a slow one by its heartbeat (:meth:`.coord.Coordinator.collect`): a worker whose
heartbeat stood still for ``dropout_after_s`` before its message came has dropped out.

The aggregator is the SecAgg server. After each phase it publishes who is still in (JSON
``{"ranks": [...]}``), or ``{"error": sentence}`` when the round cannot go on:

1. **keys** -- every worker posts its public keys; the aggregator publishes U1 (the workers whose
   keys came).
2. **shares** -- every worker in U1 posts its encrypted share pairs (one per U1 member, readable
   only by it); the aggregator publishes U2. Phases 1 and 2 do not depend on the update, so they
   run before local training: a worker that dies while training has already shared its secrets.
3. **masked input** (after training) -- every worker in U2 posts its masked vector; the aggregator
   publishes U3, the survivors.
4. **unmask** -- every survivor posts its shares (of the self-mask seed ``b`` of a survivor, of the
   mask key ``s`` of a dropped worker); with ``t`` of them the aggregator removes the self masks
   and the dropped workers' pairwise masks and holds the sum of the survivors' vectors. The
   outcome (survivors and dropped ranks, or the error) is published for every member.

Fewer than ``t`` workers left at any phase ends the round with a sentence naming how many
survived and the threshold.
"""

from __future__ import annotations

import json
import time
from typing import Any, NoReturn

import numpy as np

from workers import secagg

from .common import TrainingError
from .coord import Coordinator

DROPOUT_AFTER_S = 15.0
"""A worker whose heartbeat stood still this long while the aggregator waited for its message has
dropped out. Shorter than the 45 s after which a waiting job gives up on a peer: a live worker's
heartbeat comes from a background thread every second, and waiting longer only delays the round."""

SHARE_LEN = 1 + secagg.SHARE_BYTES  # kind ('b' or 's') || share
PHASES = ("u1", "u2", "u3", "outcome")


class SecureRound:
    """One rank's side of one round's SecAgg instance. Workers and the aggregator take part;
    other members (validators) only read the :meth:`outcome`."""

    def __init__(self, coord: Coordinator, rnd: int, workers: list[int], agg: int, rank: int, threshold: int,
                 dropout_after_s: float = DROPOUT_AFTER_S) -> None:
        self.coord, self.rnd, self.workers, self.agg, self.rank = coord, rnd, list(workers), agg, rank
        self.threshold, self.dropout_after_s = threshold, dropout_after_s
        self.is_worker, self.is_agg = rank in self.workers, rank == agg
        self.client = secagg.Client(0, len(self.workers), threshold) if self.is_worker else None
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.keys: list[bytes] = []
        self.received: list[bytes | None] = []
        self.published: set[str] = set()
        self.sent = 0  # bytes this worker posted
        self.seconds = 0.0  # protocol time on this rank, without the wait for local training
        self.length = 0

    # ------------------------------------------------------------------ phases 1-2 (before training)

    def share_keys(self) -> None:
        """Advertise keys and share the secrets: every worker and the aggregator call this."""
        if not (self.is_worker or self.is_agg):
            return
        t0 = time.perf_counter()
        if self.client is not None:
            self._post("keys", self.client.advertise())
        if self.is_agg:
            got = self._collect("keys", self.workers, keep=True)
            self._publish("u1", self._enough(sorted(got), self.workers, "advertised their keys"))
        self.u1 = self._read("u1")
        self.keys = [self.coord.wait_for(self._name("keys"), r) for r in self.u1]
        if self.client is not None:
            self._member(self.u1)
            self.client.index, self.client.n = self.u1.index(self.rank), len(self.u1)
            self._post("cts", b"".join(self.client.share_keys(self.keys)))
        if self.is_agg:
            got = self._collect("cts", self.u1, keep=True)
            self._publish("u2", self._enough(sorted(got), self.workers, "shared their secrets"))
        self.u2 = self._read("u2")
        if self.client is not None:
            self._member(self.u2)
            c, me = secagg.CIPHER_BYTES, self.client.index
            self.received = [self.coord.wait_for(self._name("cts"), r)[me * c:(me + 1) * c] if r in self.u2 else None
                             for r in self.u1]
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ phases 3-4 (after training)

    def masked_sum(self, vector: np.ndarray | None, length: int) -> np.ndarray | None:
        """Post this worker's masked ``vector`` (``length`` values) and, as a survivor, its shares;
        on the aggregator, the sum of the survivors' vectors (None elsewhere)."""
        self.length = length
        if self.client is not None:
            assert vector is not None
            t0 = time.perf_counter()
            self._post("y", self.client.masked_input(secagg.quantize(vector), self.received).tobytes())
            self.seconds += time.perf_counter() - t0
        if self.is_agg:
            got = self._collect("y", self.u2)  # waits for the workers' training: not counted
            u3 = self._enough(sorted(got), self.workers, "sent their masked update")
            self._publish("u3", u3)
        if self.client is not None:
            t0 = time.perf_counter()
            u3 = self._read("u3")
            self._member(u3)
            self._post("reveal", self._reveal(u3))
            self.seconds += time.perf_counter() - t0
        if not self.is_agg:
            return None
        reveals = self._collect("reveal", u3)
        t0 = time.perf_counter()
        self._enough(sorted(reveals), self.workers, "revealed their shares")
        masked = {self.u1.index(r): np.frombuffer(got[r], dtype=np.uint64) for r in u3}
        total = self._unmask(masked, reveals, u3)
        self.seconds += time.perf_counter() - t0
        return total

    def _reveal(self, u3: list[int]) -> bytes:
        assert self.client is not None
        buf = np.zeros(len(self.u1) * SHARE_LEN, dtype=np.uint8)
        for j, (kind, share) in self.client.unmask([self.u1.index(r) for r in u3]).items():
            buf[j * SHARE_LEN] = ord(kind)
            buf[j * SHARE_LEN + 1:(j + 1) * SHARE_LEN] = np.frombuffer(share.to_bytes(secagg.SHARE_BYTES, "big"),
                                                                       dtype=np.uint8)
        return buf.tobytes()

    def _unmask(self, masked: dict[int, np.ndarray], got: dict[int, bytes], u3: list[int]) -> np.ndarray:
        n1 = len(self.u1)
        reveals = {}
        for r, raw in got.items():
            b = np.frombuffer(raw, dtype=np.uint8)
            reveals[self.u1.index(r)] = {j: (chr(b[j * SHARE_LEN]),
                                             int.from_bytes(b[j * SHARE_LEN + 1:(j + 1) * SHARE_LEN].tobytes(), "big"))
                                         for j in range(n1) if b[j * SHARE_LEN]}
        try:
            server = secagg.Server(n1, self.threshold, self.keys)
            total = server.unmask(masked, [self.u1.index(r) for r in self.u2], reveals)
        except secagg.SecAggError as exc:
            self._fail(f"secure aggregation cannot finish round {self.rnd}: {exc}")
        dropped = sorted(set(self.workers) - set(u3))
        unmasked = [r for r in dropped if r in self.u2]  # their pairwise masks were in the sum: removed here
        self._publish("outcome", {"survivors": u3, "dropped": dropped, "unmasked": unmasked})
        self.coord.forget(self._name("keys"), self.u1)
        self.coord.forget(self._name("cts"), self.u1)
        return secagg.dequantize(total)

    def outcome(self) -> dict[str, list[int]]:
        """{"survivors": worker ranks whose update is in the sum, "dropped": the others, "unmasked": the
        dropped ones that had shared their secrets, whose masks the survivors' shares removed}."""
        msg = json.loads(self.coord.wait_for(self._name("outcome"), self.agg))
        if "error" in msg:
            raise TrainingError(msg["error"])
        return {k: [int(r) for r in v] for k, v in msg["ranks"].items()}

    def figures(self) -> dict[str, float]:
        """What the protocol sent per worker: keys, shares, the masked 64-bit vector, the reveal."""
        per_worker = (secagg.PUBLIC_BYTES + len(self.u1) * secagg.CIPHER_BYTES + 8 * self.length
                      + len(self.u1) * SHARE_LEN)
        if self.is_agg:
            return {"secagg_bytes_per_worker": float(per_worker),
                    "plain_bytes_per_worker": float(4 * (self.length - 1))}
        return {"secagg_bytes_sent": float(self.sent)} if self.is_worker else {}

    # ------------------------------------------------------------------ messages

    def _name(self, phase: str) -> str:
        return f"secagg/{self.rnd}/{phase}"

    def _post(self, phase: str, data: bytes) -> None:
        self.coord.post(self._name(phase), data)
        self.sent += len(data)

    def _collect(self, phase: str, ranks: list[int], keep: bool = False) -> dict[int, bytes]:
        return self.coord.collect(self._name(phase), ranks, self.dropout_after_s, keep=keep)

    def _publish(self, phase: str, ranks: Any) -> None:
        self.coord.post(self._name(phase), json.dumps({"ranks": ranks}).encode())
        self.published.add(phase)

    def _read(self, phase: str) -> list[int]:
        """The aggregator's list after ``phase`` (its error raised on every rank)."""
        msg = json.loads(self.coord.wait_for(self._name(phase), self.agg))
        if "error" in msg:
            raise TrainingError(msg["error"])
        return [int(r) for r in msg["ranks"]]

    def _member(self, ranks: list[int]) -> None:
        if self.rank not in ranks:
            raise TrainingError(f"secure aggregation round {self.rnd}: the aggregator counted this worker (rank "
                                f"{self.rank}) out of the round (it seemed dead for {self.dropout_after_s:.0f} s)")

    def _enough(self, present: list[int], everyone: list[int], what: str) -> list[int]:
        """``present``, when at least the threshold; else the round fails on every rank."""
        if len(present) < self.threshold:
            missing = sorted(set(everyone) - set(present))
            self._fail(f"secure aggregation cannot finish round {self.rnd}: only {len(present)} of {len(everyone)} "
                       f"workers survived (worker rank(s) {missing} dropped out before they {what}) and unmasking "
                       f"needs {self.threshold}, the threshold ({self.threshold} of {len(everyone)})")
        return present

    def _fail(self, message: str) -> NoReturn:
        """Publish ``message`` in every phase not yet published (whoever waits there raises it), then raise."""
        for phase in PHASES:
            if phase not in self.published:
                self.coord.post(self._name(phase), json.dumps({"error": message}).encode())
                self.published.add(phase)
        raise TrainingError(message)
