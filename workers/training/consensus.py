"""Consensus pieces shared by the training modes (pure logic plus the raft replica store).

* :func:`resolve_rule` -- which aggregation rule a job really uses. Under consensus
  ``byzantine`` a job that left ``aggregation_rule`` at its default ``fedavg`` gets a robust
  default instead: ``krum`` when the Krum assumption n >= 2f + 3 holds for its n workers,
  otherwise the coordinate ``median``. Any other consensus uses the job's rule as given.
* :class:`Reputation` -- the aggregator's (sync: the hub's) reputation of every worker rank,
  an exponential moving average in [0, 1] updated each round by
  ``workers.aggregation.reputation_update``. An update counts against its sender when it is
  non-finite, when its distance to the aggregate is outlying (> 3 x the round's median
  distance), when Multi-Krum left it out, or when proof-of-learning left it out (its
  validation loss was worse than the committed model's beyond the tolerance). Krum's own
  "rejections" do not count: Krum keeps exactly one update, so being one of the n - 1 others
  is no accusation (only the distance says something). With ``reputation_weighting`` the
  FedAvg / Multi-Krum weight of a worker is its sample count x its reputation (falling back
  to the sample counts alone if every reputation has reached 0).
* :func:`gossip_neighbours` / :func:`mixing_weights` -- the gossip graph over worker
  positions and its Metropolis-Hastings weights.
* :func:`pol_accepts` -- the proof-of-learning test.
* :class:`RaftReplica` -- a node's copy of the leader's model versions (in memory and in
  ``<sandbox>/raft/``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.aggregation import reputation_update
from workers.protocol import TrainJob

from .common import TrainingError

# --------------------------------------------------------------------------- rules

WEIGHTED_RULES = ("fedavg", "multi_krum")


def resolve_rule(job: TrainJob, n_workers: int) -> tuple[str, str | None]:
    """(rule, note): the rule to apply and, when it differs from the job's, why."""
    rule = getattr(job, "aggregation_rule", None) or "fedavg"
    if getattr(job, "consensus", None) == "byzantine" and rule == "fedavg":
        f = int(job.byzantine_f)
        if n_workers >= 2 * f + 3:
            return "krum", f"byzantine consensus: fedavg is not robust; using krum (n={n_workers} >= 2f+3 with f={f})"
        return "median", (f"byzantine consensus: fedavg is not robust and krum needs n >= 2f+3 "
                          f"(n={n_workers}, f={f}); using the coordinate median")
    if rule in ("krum", "multi_krum") and n_workers <= int(job.byzantine_f) + 2:
        raise TrainingError(f"aggregation rule {rule} needs more than f + 2 = {int(job.byzantine_f) + 2} workers; "
                            f"this job has {n_workers}. Lower byzantine_f or use median / trimmed_mean")
    return rule, None


def rule_kwargs(job: TrainJob) -> dict[str, Any]:
    return {"f": int(job.byzantine_f), "beta": float(job.trim_beta), "m": job.multi_krum_m}


# --------------------------------------------------------------------------- reputation


@dataclass
class Reputation:
    """Reputation per worker rank, kept by the aggregating rank."""

    ranks: list[int]
    decay: float = 0.9
    values: dict[int, float] = field(default_factory=dict)
    rejected_updates: int = 0

    def __post_init__(self) -> None:
        self.values = {r: 1.0 for r in self.ranks}

    def observe(self, info: dict[str, Any], rule: str) -> list[int]:
        """Update from one aggregation's ``info`` (rows in ``ranks`` order); returns the ranks
        penalised this round (non-finite, outlying or left out by Multi-Krum)."""
        dists = info.get("distances_to_aggregate") or []
        distances = {self.ranks[i]: float(x) for i, x in enumerate(dists)}
        accused = {self.ranks[i] for i in (info.get("nonfinite") or []) + (info.get("excluded") or [])}
        if rule == "multi_krum":
            accused |= {self.ranks[i] for i in info.get("rejected") or []}
        self.rejected_updates += len(info.get("rejected") or [])
        self.values = reputation_update(self.values, distances, accused, self.decay)
        finite = [x for x in distances.values() if math.isfinite(x)]
        med = float(np.median(finite)) if finite else math.inf
        outlying = {r for r, x in distances.items() if not math.isfinite(x) or x > 3.0 * med}
        return sorted(accused | outlying)

    def weights(self, counts: np.ndarray) -> np.ndarray:
        rep = np.asarray([self.values[r] for r in self.ranks], dtype=np.float64)
        w = np.asarray(counts, dtype=np.float64) * rep
        return w if w.sum() > 0 else np.asarray(counts, dtype=np.float64)

    def report(self, sink: Any) -> None:
        for r, v in self.values.items():
            sink.node_stat(f"reputation_rank{r}", v)
        sink.node_stat("rejected_updates", self.rejected_updates)

    def text(self) -> str:
        return ", ".join(f"{r}: {v:.2f}" for r, v in sorted(self.values.items()))


# --------------------------------------------------------------------------- gossip


def gossip_neighbours(topology: str, n: int) -> list[list[int]]:
    """Neighbours of every worker position 0..n-1 (symmetric, no self loops).

    ring: previous and next position; mesh: everyone; hierarchical: binary-tree parent
    ((i - 1) // 2) and children (2i + 1, 2i + 2); star: the hub (position 0) with everyone.
    """
    nb: list[set[int]] = [set() for _ in range(n)]

    def link(a: int, b: int) -> None:
        if a != b and 0 <= a < n and 0 <= b < n:
            nb[a].add(b)
            nb[b].add(a)

    for i in range(n):
        if topology == "ring":
            link(i, (i + 1) % n)
        elif topology == "mesh":
            for j in range(i + 1, n):
                link(i, j)
        elif topology == "hierarchical":
            if i > 0:
                link(i, (i - 1) // 2)
        elif topology == "star":
            link(0, i)
        else:
            raise TrainingError(f"unknown topology {topology!r} for gossip; use ring, mesh, hierarchical or star")
    return [sorted(s) for s in nb]


def mixing_weights(neighbours: list[list[int]]) -> list[dict[int, float]]:
    """Metropolis-Hastings weights: w_ij = 1 / (1 + max(deg_i, deg_j)) for each neighbour,
    w_ii = 1 - sum_j w_ij. The matrix is symmetric and doubly stochastic, so repeated
    gossip keeps the workers' mean model and drives every model to it on any connected
    graph (equal weights over self + neighbours would not keep the mean on a star or tree)."""
    deg = [len(x) for x in neighbours]
    out = []
    for i, nbs in enumerate(neighbours):
        row = {j: 1.0 / (1.0 + max(deg[i], deg[j])) for j in nbs}
        row[i] = 1.0 - sum(row.values())
        out.append(row)
    return out


# --------------------------------------------------------------------------- proof of learning


def pol_accepts(previous: float, candidate: float, tolerance: float) -> bool:
    """A candidate is committed when its validation loss is finite and at most
    ``previous * (1 + tolerance)`` (relative rise; for a non-positive previous loss the
    allowed rise is ``tolerance * |previous|``)."""
    if not math.isfinite(candidate):
        return False
    if not math.isfinite(previous):
        return True
    return candidate <= previous + float(tolerance) * abs(previous)


# --------------------------------------------------------------------------- raft

RAFT_DIR = "raft"
COMMITTED = "committed.safetensors"
PENDING = "pending.safetensors"


def majority(acks: list[float] | torch.Tensor, members: int) -> bool:
    """True when more than half of ``members`` acknowledged."""
    return float(sum(float(a) for a in acks)) * 2 > int(members)


class RaftReplica:
    """One node's replica of the leader's model log: the last committed version in memory
    (flat weights + version) and on disk (``<sandbox>/raft/committed.safetensors``, a normal
    checkpoint -- ``resume_from`` accepts it). A proposed version is written to
    ``pending.safetensors`` first (the acknowledgement means "stored"); :meth:`commit` renames it
    over ``committed.safetensors`` atomically, :meth:`discard` drops it."""

    def __init__(self, sandbox: Path, writer: Any, version: int = 0) -> None:
        self.dir = Path(sandbox) / RAFT_DIR
        self.writer = writer  # writer(path, version) -> None: writes the checkpoint to path atomically
        self.version = int(version)
        self.weights: torch.Tensor | None = None
        self._pending: tuple[int, torch.Tensor] | None = None

    @property
    def committed_path(self) -> Path:
        return self.dir / COMMITTED

    def store(self, version: int, flat: torch.Tensor) -> bool:
        """Store a proposed version; True = acknowledged (written and finite)."""
        self._pending = None
        if not bool(torch.isfinite(flat).all()):
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer(self.dir / PENDING, version)  # the writer writes atomically
        except OSError:
            return False
        self._pending = (int(version), flat.detach().clone())
        return True

    def commit(self, version: int, flat: torch.Tensor) -> bool:
        """The group committed ``version``: hold it in memory and make the stored copy the
        committed file. False when this node had not stored it (it did not acknowledge) or
        the rename failed; the in-memory copy is updated either way."""
        pending, self._pending = self._pending, None
        self.version, self.weights = int(version), flat.detach().clone()
        if pending is None or pending[0] != int(version):
            return False
        try:
            os.replace(self.dir / PENDING, self.committed_path)
        except OSError:
            return False
        return True

    def discard(self) -> None:
        self._pending = None
        try:
            (self.dir / PENDING).unlink(missing_ok=True)
        except OSError:
            pass


__all__ = [
    "Reputation",
    "RaftReplica",
    "gossip_neighbours",
    "majority",
    "mixing_weights",
    "pol_accepts",
    "resolve_rule",
    "rule_kwargs",
]
