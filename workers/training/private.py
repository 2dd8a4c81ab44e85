"""The federated round's privacy machinery: DP-SGD on a worker (opacus) and secure aggregation
carried over torch.distributed (:mod:`workers.secagg` holds the protocol itself)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from workers import secagg
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


def _all_gather_bytes(data: bytes, size: int, group: Any, members: list[int]) -> list[bytes]:
    t = torch.zeros(size, dtype=torch.uint8)
    if data:
        t[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty(size, dtype=torch.uint8) for _ in members]
    dist.all_gather(out, t, group=group)
    return [bytes(o.numpy().tobytes()) for o in out]


def _gather_to(t: torch.Tensor, dst: int, is_dst: bool, group: Any, members: list[int]) -> list[torch.Tensor] | None:
    table = [torch.empty_like(t) for _ in members] if is_dst else None
    dist.gather(t, gather_list=table, dst=dst, group=group)
    return table


def secure_sum(ctx: Ctx, group: Any, members: list[int], agg: int, vector: np.ndarray | None,
               length: int, stats: SecAggStats) -> np.ndarray | None:
    """One SecAgg instance over the federated group: every worker passes its real ``vector``
    (``length`` values), other members None. Returns the sum of the workers' vectors on the
    aggregator (None elsewhere); the aggregator never holds a single worker's vector."""
    t0 = time.perf_counter()
    workers = list(ctx.plan.workers)
    n, rank = len(workers), ctx.plan.rank
    threshold = secagg.default_threshold(n)
    me = workers.index(rank) if rank in workers else None
    client = secagg.Client(me, n, threshold) if me is not None else None
    sent = 0

    # 1. advertise keys (the aggregator routes them: here, one all_gather of the group)
    keys_all = _all_gather_bytes(client.advertise() if client else b"", secagg.PUBLIC_BYTES, group, members)
    keys = [keys_all[members.index(r)] for r in workers]
    # 2. share keys: n encrypted share pairs per worker, each readable only by its addressee
    size = n * secagg.CIPHER_BYTES
    cts = b"".join(client.share_keys(keys)) if client else b""
    all_cts = _all_gather_bytes(cts, size, group, members)
    # 3. masked input, gathered by the aggregator
    if client is not None:
        assert vector is not None and me is not None
        c = secagg.CIPHER_BYTES
        received: list[bytes | None] = [all_cts[members.index(r)][me * c:(me + 1) * c] for r in workers]
        y = client.masked_input(secagg.quantize(vector), received)
        sent += secagg.PUBLIC_BYTES + size + y.nbytes
    else:
        y = np.zeros(length, dtype=np.uint64)
    masked = _gather_to(torch.from_numpy(y.view(np.int64)), agg, rank == agg, group, members)
    # 4. unmask: every worker whose masked input arrived survives (a worker that failed ends the
    # torch.distributed round before this point; the protocol's own dropout path is unit-tested)
    survivors = list(range(n))
    share_len = 1 + secagg.SHARE_BYTES
    buf = np.zeros(n * share_len, dtype=np.uint8)
    if client is not None:
        for j, (kind, share) in client.unmask(survivors).items():
            buf[j * share_len] = ord(kind)
            buf[j * share_len + 1:(j + 1) * share_len] = np.frombuffer(share.to_bytes(secagg.SHARE_BYTES, "big"),
                                                                         dtype=np.uint8)
        sent += buf.nbytes
    reveal = _gather_to(torch.from_numpy(buf), agg, rank == agg, group, members)
    total = None
    if rank == agg:
        assert masked is not None and reveal is not None
        server = secagg.Server(n, threshold, keys)
        inputs = {i: masked[members.index(r)].numpy().view(np.uint64) for i, r in enumerate(workers)}
        reveals: dict[int, dict[int, tuple[str, int]]] = {}
        for i, r in enumerate(workers):
            raw = reveal[members.index(r)].numpy()
            reveals[i] = {j: (chr(raw[j * share_len]),
                              int.from_bytes(raw[j * share_len + 1:(j + 1) * share_len].tobytes(), "big"))
                          for j in range(n)}
        total = secagg.dequantize(server.unmask(inputs, list(range(n)), reveals))
        per_worker = (len(keys[0]) + size + masked[members.index(workers[0])].numel() * 8
                      + reveal[members.index(workers[0])].numel())
        ctx.bytes_received += n * per_worker
        figures = {"secagg_bytes_per_worker": float(per_worker), "plain_bytes_per_worker": float(4 * (length - 1))}
    else:
        ctx.bytes_sent += sent
        figures = {"secagg_bytes_sent": float(sent)} if client is not None else {}
    stats.add(time.perf_counter() - t0, figures)
    return total
