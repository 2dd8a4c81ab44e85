"""The federated round's secure aggregation over a store (workers.training.secure_round), with one
thread per rank and a shared in-memory store: a worker that dies after sharing its secrets is
recovered (the aggregate is the survivors' plain sum), too few survivors fail with a sentence."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch.distributed as dist

from workers.secagg import default_threshold
from workers.training.common import TrainingError
from workers.training.coord import Coordinator
from workers.training.secure_round import SecureRound

D = 400
DROPOUT_S = 3.0  # a live rank beats every second; a closed coordinator stops beating


def _round(n: int, dead: set[int]) -> tuple[dict[int, object], list[np.ndarray], np.ndarray]:
    """Aggregator rank 0 and workers 1..n; the ``dead`` workers stop (heartbeat and all) after
    sharing their secrets, i.e. while the others train. Returns each rank's result (aggregator:
    (sum, outcome); workers: outcome; a TrainingError where one was raised)."""
    store, stop = dist.HashStore(), threading.Event()
    workers = list(range(1, n + 1))
    rng = np.random.default_rng(7)
    updates = [rng.normal(0, 0.05, D) for _ in workers]
    counts = rng.integers(50, 500, n).astype(np.float64)
    coords = {r: Coordinator("test", r, stop, store=store) for r in [0, *workers]}
    results: dict[int, object] = {}

    def party(r: int) -> None:
        sr = SecureRound(coords[r], 2, workers, 0, r, default_threshold(n), dropout_after_s=DROPOUT_S)
        try:
            sr.share_keys()
            if r in dead:
                coords[r].close()  # dies mid-round: its secrets are shared, its update never comes
                return
            i = r - 1
            vector = np.append(counts[i] * updates[i], counts[i]) if r else None
            total = sr.masked_sum(vector, D + 1)
            results[r] = (total, sr.outcome()) if r == 0 else sr.outcome()
        except TrainingError as exc:
            results[r] = exc

    threads = [threading.Thread(target=party, args=(r,)) for r in coords]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in coords.values():
        c.close()
    return results, updates, counts


def test_a_worker_dying_mid_round_is_recovered_from_the_survivors_shares():
    results, updates, counts = _round(4, dead={3})
    total, outcome = results[0]
    assert outcome == {"survivors": [1, 2, 4], "dropped": [3], "unmasked": [3]}
    assert all(results[r] == outcome for r in (1, 2, 4))
    alive = [0, 1, 3]  # positions of ranks 1, 2, 4
    plain = sum(counts[i] * updates[i] for i in alive)
    assert np.abs(total[:-1] - plain).max() < 1e-5 and total[-1] == pytest.approx(counts[alive].sum())
    # FedAvg over the survivors, as the round's new model uses it
    fedavg = plain / counts[alive].sum()
    assert np.abs(total[:-1] / total[-1] - fedavg).max() < 1e-5


def test_too_few_survivors_fail_the_round_naming_the_threshold():
    results, _, _ = _round(3, dead={2, 3})
    for r in (0, 1):
        assert isinstance(results[r], TrainingError)
        text = str(results[r])
        assert "only 1 of 3 workers survived" in text and "needs 2, the threshold (2 of 3)" in text
