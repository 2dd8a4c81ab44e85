"""The federated round's privacy machinery: DP-SGD on a worker (opacus) and secure aggregation's
cost figures (:mod:`workers.secagg` holds the protocol, :mod:`.secure_round` carries it)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.privacy import RoundCost, local_cost

from .common import Sums, batch_loss
from .runtime import Ctx


def session_cost(ctx: Ctx) -> RoundCost:
    """Local DP: the round cost of the worker that spends the most (the smallest shard); every
    rank computes it alike from the shard sizes setup shared, so all agree without a message."""
    dp, job = ctx.job.differential_privacy, ctx.job
    assert dp is not None
    sizes = ctx.setup.worker_train_sizes
    costs = [local_cost(dp, n, job.batch_size, job.local_epochs, max(sizes)) for n in sorted(set(sizes))]
    return max(costs, key=lambda c: c.after(1))


class LocalDP:
    """DP-SGD for this worker's local epochs: opacus' per-example gradients (GradSampleModule),
    clipping and noise (DPOptimizer) and Poisson sampling (UniformWithReplacementSampler), with
    an RDP accountant stepped by the optimizer."""

    def __init__(self, ctx: Ctx, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        dp, job = ctx.job.differential_privacy, ctx.job
        assert dp is not None and ctx.data is not None
        self.ctx = ctx
        self.n = len(ctx.data.train)
        self.cost = local_cost(dp, self.n, job.batch_size, job.local_epochs, max(ctx.setup.worker_train_sizes))
        self.sample_rate = self.cost.sample_rate
        # The noise and the batches must not be predictable from the job's seed (which seeds torch's
        # global generator): a generator seeded from the OS's entropy.
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.module = GradSampleModule(model)
        self.opt = DPOptimizer(opt, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                               expected_batch_size=job.batch_size, loss_reduction="mean", generator=self.generator)
        self.accountant = RDPAccountant()
        self.opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    def epoch(self, rnd: int, local_epoch: int, sums: Sums, total_steps: int) -> None:
        """One local epoch: int(1/q) Poisson-sampled steps (q = batch_size / shard size)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        ctx, job = self.ctx, self.ctx.job
        assert ctx.data is not None
        X, y = ctx.data.train.X, ctx.data.train.y
        sampler = UniformWithReplacementSampler(num_samples=self.n, sample_rate=self.sample_rate,
                                                generator=self.generator)
        steps = len(sampler)
        for s, batch in enumerate(sampler):
            t0 = time.perf_counter()
            k = ((rnd - 1) * job.local_epochs + local_epoch) * steps + s
            ctx.schedule_lr(self.opt, k, total_steps)
            self.opt.zero_grad(set_to_none=True)
            idx = torch.as_tensor(batch, dtype=torch.long)
            if idx.numel() == 0:
                # An empty Poisson batch (probability (1-q)^n): a noise-only step, as opacus does.
                for p in self.module.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros(0, *p.shape)
            else:
                loss, correct, count, tokens = batch_loss(self.module, X[idx], y[idx], ctx.kind, False)
                loss.backward()
                sums.add_train(float(loss.detach()), correct, count, int(idx.numel()), tokens)
                ctx.samples_processed += int(idx.numel())
            self.opt.step()
            ctx.steps += 1
            ctx.step_seconds += time.perf_counter() - t0
            ctx.sink.node_stat("round_steps_done", local_epoch * steps + s + 1)

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.cost.delta))

    def close(self) -> None:
        """Take opacus' hooks off the model, which the node then serves and exports."""
        self.module._close()


# --------------------------------------------------------------------------- secure aggregation

@dataclass
class SecAggStats:
    """What secure aggregation cost this rank in the last round: the protocol's wall time
    (key exchange, masking, unmasking and their transfers) and the bytes of its messages -- a
    worker's own, or on the aggregator one worker's, beside the 4 bytes per weight plain FedAvg
    sends."""

    rounds: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def add(self, seconds: float, figures: dict[str, float]) -> None:
        self.rounds += 1
        self.last = {"secagg_ms": 1000.0 * seconds, **figures}
