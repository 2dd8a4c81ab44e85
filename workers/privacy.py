"""Differential privacy for federated sessions: the accountant, central clipping and noise, and
which models and options can take DP at all.

Every epsilon here comes from opacus' RDP accountant (``opacus.accountants.RDPAccountant``);
nothing computes Renyi divergences by hand.

* ``local`` (record-level DP per worker): each worker runs DP-SGD through opacus
  (``GradSampleModule`` per-example gradients, ``DPOptimizer`` clipping to ``max_grad_norm`` and
  Gaussian noise ``noise_multiplier * max_grad_norm`` per step), its batches Poisson-sampled
  with rate ``q = batch_size / shard size`` by opacus' ``UniformWithReplacementSampler``. One
  accountant per worker steps with every optimizer step; the shards are disjoint, so the
  session's epsilon is the largest worker's (parallel composition).
* ``central`` (user-level DP: one worker's whole shard): the aggregator clips each worker's
  round update (its weights minus the global model it started from) to ``max_grad_norm``,
  sums them, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides by the
  number of workers. Every worker takes part in every round, so the accountant steps once per
  round with sample rate 1 (the fraction of clients per round).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from workers.protocol import DifferentialPrivacy, TrainJob

DEFAULT_DELTA = 1e-5


def delta_for(dp: DifferentialPrivacy, n: int) -> float:
    """The delta epsilon is reported at: the client's, else min(1e-5, 1/n) (n: records of the
    largest shard for local DP, workers for central DP)."""
    if dp.delta is not None:
        return dp.delta
    return min(DEFAULT_DELTA, 1.0 / max(1, n))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent after ``steps`` Gaussian-mechanism steps (opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class RoundCost:
    """What one round spends: ``steps`` Gaussian steps at ``sample_rate`` (per worker for local DP)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float

    def after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds: opacus' RDP analysis (what its RDPAccountant computes),
        with the one-step RDP curve computed once (RDP adds up over steps)."""
        from opacus.accountants.analysis.rdp import get_privacy_spent

        if rounds <= 0:
            return 0.0
        eps, _ = get_privacy_spent(orders=_orders(), rdp=self._rdp_per_step * (self.steps * rounds), delta=self.delta)
        return float(eps)

    @cached_property
    def _rdp_per_step(self) -> np.ndarray:
        from opacus.accountants.analysis.rdp import compute_rdp

        return np.asarray(compute_rdp(q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1,
                                      orders=_orders()))

    def affordable_rounds(self, target: float, most: int) -> int:
        """The most rounds (<= ``most``) whose epsilon stays within ``target`` (0: not even one)."""
        lo, hi = 0, most  # epsilon grows with rounds: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.after(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo


def central_cost(dp: DifferentialPrivacy, n_workers: int) -> RoundCost:
    return RoundCost(dp.noise_multiplier, 1.0, 1, delta_for(dp, n_workers))


def local_cost(dp: DifferentialPrivacy, shard: int, batch_size: int, local_epochs: int,
               largest_shard: int | None = None) -> RoundCost:
    """A worker with ``shard`` training records: Poisson rate batch/shard, 1/rate steps per local epoch."""
    q = min(1.0, batch_size / shard)
    return RoundCost(dp.noise_multiplier, q, local_epochs * steps_per_epoch(q),
                     delta_for(dp, largest_shard or shard))


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson-sampled steps in one local epoch: opacus' sampler runs int(1 / sample_rate) of them."""
    return max(1, int(1 / sample_rate))


def budget_refusal(cost: RoundCost, target: float | None, what: str) -> str | None:
    """Why a session cannot start under ``target_epsilon``; None when a round fits."""
    if target is None:
        return None
    first = cost.after(1)
    if first > target:
        return (f"one federated round of {what} already spends epsilon {first:.3g} at delta {cost.delta:.3g}, "
                f"above target_epsilon {target:g}; raise noise_multiplier, lower local_epochs or batch_size, "
                "or raise target_epsilon")
    return None


# --------------------------------------------------------------------------- central DP

def clip_update(update: np.ndarray, max_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``max_norm`` when it is longer."""
    norm = float(np.linalg.norm(update))
    return update * (max_norm / norm) if norm > max_norm else update


def central_aggregate(updates: np.ndarray, dp: DifferentialPrivacy, rng: np.random.Generator) -> np.ndarray:
    """The noised mean of the clipped updates (one row per worker)."""
    total = sum((clip_update(u.astype(np.float64), dp.max_grad_norm) for u in updates),
                start=np.zeros(updates.shape[1]))
    return noised_mean(total, len(updates), dp, rng)


def noised_mean(clipped_sum: np.ndarray, n: int, dp: DifferentialPrivacy, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``noise_multiplier * max_grad_norm`` on a sum of clipped updates, then / n."""
    noise = rng.normal(0.0, dp.noise_multiplier * dp.max_grad_norm, size=clipped_sum.shape)
    return (clipped_sum + noise) / n


# --------------------------------------------------------------------------- what DP can run on

def unsupported_layers(model: object) -> list[str]:
    """Sentences naming the layers of ``model`` opacus cannot train with per-example gradients."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)  # type: ignore[arg-type]
    # opacus' first sentence names the layer ("We do not support nn.LSTM because ..."); the rest
    # advises a replacement module, which would change the model's parameter names here.
    return list(dict.fromkeys(str(e).split(". ")[0].strip() for e in errors))


# --------------------------------------------------------------------------- what a session may combine

ROBUST_RULES_NEED_UPDATES = ("median", "trimmed_mean", "krum", "multi_krum")


def session_refusal(job: TrainJob, n_workers: int) -> str | None:
    """Why ``job``'s differential_privacy / secure_aggregation cannot run as asked; None when it can.
    Nothing is weakened silently: every combination that would change what was asked is refused."""
    dp, secure = job.differential_privacy, job.secure_aggregation
    if dp is None and not secure:
        return None
    asked = " and ".join(x for x in ("differential_privacy" if dp else "", "secure_aggregation" if secure else "") if x)
    if job.mode != "federated":
        return (f"{asked} runs in federated mode only (synchronous and parameter-server training exchange "
                "gradients every step, which this server does not privatize); set federated=true")
    if job.consensus == "gossip":
        return (f"{asked} needs an aggregator, and consensus 'gossip' has none; use consensus "
                "'proof-of-learning' or 'raft'")
    needs = ("secure_aggregation (the aggregator only ever learns the sum of the updates)" if secure
             else "central differential privacy (the aggregate is the noised mean of clipped updates)"
             if dp and dp.mode == "central" else None)
    if needs:
        if job.consensus == "byzantine" or job.aggregation_rule != "fedavg":
            what = ("consensus 'byzantine'" if job.consensus == "byzantine"
                    else f"aggregation_rule {job.aggregation_rule!r}")
            return (f"{what} needs each worker's own update, which {needs} does not allow; use "
                    "aggregation_rule 'fedavg' with consensus 'proof-of-learning' or 'raft'")
        if job.reputation_weighting:
            return (f"reputation_weighting scores each worker's own update, which {needs} does not allow; "
                    "turn reputation_weighting off")
    if secure and n_workers < 2:
        return f"secure_aggregation needs at least 2 workers to hide one update in a sum; this cluster has {n_workers}"
    if dp is not None and dp.mode == "local":
        for name, bad in (("gradient_accumulation", job.gradient_accumulation > 1), ("grad_clip", job.grad_clip),
                          ("mixed_precision", job.mixed_precision),
                          ("gradient_checkpointing", job.gradient_checkpointing)):
            if bad:
                return (f"{name} cannot combine with local differential privacy (DP-SGD clips each example's "
                        f"gradient to max_grad_norm and draws Poisson batches itself); drop {name}")
    if dp is not None and dp.mode == "central":
        return budget_refusal(central_cost(dp, n_workers), dp.target_epsilon, "central DP")
    return None


def layer_refusal(job: TrainJob, kind: str, input_shape: list[int], num_classes: int) -> str | None:
    """Why local DP cannot train ``job``'s model: the layers opacus computes no per-example
    gradients for, named. The model is built on torch's meta device (no memory) for a stand-in
    task of the data's kind (the layer types do not depend on the sizes)."""
    import torch

    from workers.models import ModelError, TaskInfo, build_model

    dp = job.differential_privacy
    if dp is None or dp.mode != "local":
        return None
    text = kind in ("text", "lm")
    task = TaskInfo(kind, () if text else tuple(input_shape), 64 if kind == "lm" else max(2, num_classes),  # type: ignore[arg-type]
                    64 if text else 0, 16 if text else 0)
    try:
        with torch.device("meta"):
            model = build_model(job.architecture, job.model, task, layers=job.layers or None)
    except ModelError:
        return None  # the node's own checks answer for a model that cannot be built
    problems = unsupported_layers(model)
    if not problems:
        return None
    return (f"local differential privacy cannot train this {job.architecture} model: " + "; ".join(problems)
            + " (opacus computes per-example gradients only for the layers it supports); choose a model without "
            "that layer (the mlp and cnn presets work), or differential_privacy mode 'central'")


def local_budget_refusal(job: TrainJob, smallest_shard: int, largest_shard: int) -> str | None:
    """Local DP under ``target_epsilon``: refused before start when one round on the smallest
    shard (as the server estimates it from the nodes' checks) already spends more. The nodes
    check again with the exact shard sizes before any training."""
    dp = job.differential_privacy
    if dp is None or dp.mode != "local" or dp.target_epsilon is None or smallest_shard < 1:
        return None
    cost = local_cost(dp, smallest_shard, job.batch_size, job.local_epochs, largest_shard)
    return budget_refusal(cost, dp.target_epsilon, f"local DP-SGD ({job.local_epochs} local epoch(s) at sample "
                          f"rate {cost.sample_rate:.3g}, about {smallest_shard} records on the smallest shard)")
