"""The state one rank carries through a training job, and what every mode does at an
epoch / round boundary: agree on stopping, reduce the metric sums, report, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.protocol import TrainJob

from .checkpoint import SandboxQuota, checkpoint_dir, save_checkpoint
from .common import Split, Sums, TrainedModel, batch_loss, evaluate, rss_mb, set_lr, try_load_optimizer
from .coord import Coordinator
from .progress import ProgressSink
from .schedule import Plateau, lr_factor
from .setup import Encoded, Plan, Setup

log = logging.getLogger(__name__)

STOP_CHECK_EVERY = 10
"""Steps between the collective stop checks inside an epoch (sync and parameter-server)."""


@dataclass
class Ctx:
    job: TrainJob
    plan: Plan
    setup: Setup
    sink: ProgressSink
    stop: threading.Event
    coord: Coordinator
    sandbox: Path
    data: Encoded | None
    model: nn.Module
    start: int  # first epoch / round to run (1-based)
    ckpt: dict[str, Any] | None
    groups: dict[str, Any]
    judge_val: Split | None = None
    """The whole validation split on a rank that judges candidate models (proof-of-learning)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where synchronous data parallel computes: the pinned GPU on an nccl group, else CPU."""
    node_id: str = ""
    # node counters
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    comm_s: float = 0.0
    samples_processed: int = 0
    step_seconds: float = 0.0
    steps: int = 0
    checkpoints_created: int = 0
    last_checkpoint: str | None = None
    latest: dict[str, float] = field(default_factory=dict)
    stopped: bool = False
    epoch: int = 0
    lr: float = 0.0
    plateau: Plateau = field(default_factory=Plateau)
    best_metric: float | None = None
    best_checkpoint: str | None = None

    # ------------------------------------------------------------------ facts

    @property
    def kind(self) -> str:
        return self.setup.kind

    @property
    def num_classes(self) -> int:
        return 0 if self.kind == "lm" else len(self.setup.label_names)

    @property
    def is_reporter(self) -> bool:
        return self.plan.rank == self.plan.reporter

    @property
    def total(self) -> int:
        return self.job.rounds if self.job.mode == "federated" else self.job.epochs

    @property
    def quota(self) -> SandboxQuota:
        """What checkpoints written in this node's sandbox may take (the server's FLOW_NEXUS_MAX_SANDBOX_BYTES)."""
        return SandboxQuota(self.node_id or "this node", self.sandbox, self.job.sandbox_quota_bytes)

    def say(self, line: str) -> None:
        self.sink.log(line)

    def steps_per_epoch(self, sizes: list[int]) -> tuple[int, int]:
        """(optimizer steps per epoch, micro-batches per step) for shards of ``sizes``: every
        rank does as many steps as the smallest shard allows, so nobody waits."""
        micro = min(sizes) // self.job.batch_size
        accum = max(1, min(self.job.gradient_accumulation, micro))
        if accum < self.job.gradient_accumulation:
            self.say(f"gradient_accumulation lowered to {accum}: the smallest shard holds only {micro} batches")
        return max(1, micro // accum), accum

    def forward_backward(self, model: nn.Module, order: Any, first: int, accum: int, sums: Sums,
                         no_sync: Any = None) -> None:
        """``accum`` micro-batches starting at batch ``first`` of ``order``: forward, loss,
        backward (gradients accumulate, scaled by 1/accum). With ``no_sync`` (DDP), all but the
        last micro-batch skip the gradient exchange."""
        assert self.data is not None
        X, y = self.data.train.X, self.data.train.y
        B = self.job.batch_size
        for k in range(accum):
            idx = torch.from_numpy(order[(first + k) * B : (first + k + 1) * B])
            xb, yb = X[idx].to(self.device), y[idx].to(self.device)
            cm = no_sync() if (no_sync is not None and k < accum - 1) else contextlib.nullcontext()
            with cm:
                loss, correct, count, tokens = batch_loss(model, xb, yb, self.kind, self.job.mixed_precision)
                (loss / accum).backward()
            sums.add_train(float(loss.detach()), correct, count, int(idx.numel()), tokens)
            self.samples_processed += int(idx.numel())

    def schedule_lr(self, opt: torch.optim.Optimizer | None, step: int, total: int) -> None:
        """Optimizer step ``step`` of ``total`` (0-based): its learning rate from the schedule every
        mode shares (schedule.lr_factor, the job's lr_schedule) into ``self.lr``, and into ``opt`` when there is one."""
        factor = lr_factor(step, total, self.job.lr_schedule, self.job.warmup_steps) * self.plateau.factor
        self.lr = self.job.learning_rate * factor
        set_lr(opt, self.lr)

    def restore_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Resume: load the checkpoint's optimizer state when it was made by the same
        optimizer for the same parameters (anything else starts fresh)."""
        ck = self.ckpt
        if ck is None or not ck.get("optimizer_state"):
            return
        if (ck.get("job") or {}).get("optimizer") != self.job.optimizer:
            self.say(f"checkpoint optimizer differs from {self.job.optimizer}; its state starts fresh")
            return
        if try_load_optimizer(opt, ck["optimizer_state"], f"rank {self.plan.rank}"):
            self.say("optimizer state restored from the checkpoint")

    # ------------------------------------------------------------------ collectives

    def agree_stop(self, group: Any) -> bool:
        """All ranks of ``group`` learn whether any of them was asked to stop."""
        flag = torch.tensor([1.0 if self.stop.is_set() else 0.0])
        t0 = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        self.comm_s += time.perf_counter() - t0
        return bool(flag.item() > 0)

    def finish_step(self, step: int, t0: float, group: Any) -> bool:
        """Book optimizer step ``step`` (just done, started at ``t0``): counters and progress.
        True when the ranks of ``group`` agreed to stop (asked every STOP_CHECK_EVERY steps)."""
        self.steps += 1
        self.step_seconds += time.perf_counter() - t0
        self.sink.update(step=step)
        if step % STOP_CHECK_EVERY == 0 and self.agree_stop(group):
            self.stopped = True
            return True
        return False

    def epoch_sums(self, local: Sums, group: Any, model: nn.Module | None) -> Sums:
        """End of an epoch: evaluate ``model`` on this rank's validation part (when given), then
        sum everyone's figures and stop flags over ``group``."""
        if model is not None:
            local.set_val(evaluate(model, self.data.val, self.kind, self.num_classes))
        local.flag = 1.0 if self.stop.is_set() else 0.0
        glob = self.reduce_sums(local, group)
        self.stopped = self.stopped or glob.flag > 0
        return glob

    def reduce_sums(self, sums: Sums, group: Any) -> Sums:
        t = sums.tensor()
        t0 = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.comm_s += time.perf_counter() - t0
        return Sums.from_tensor(t, self.num_classes)

    def validate_start(self, model: nn.Module | None, group: Any, known: Sums | None = None) -> None:
        """Training that starts from loaded weights (a Hugging Face directory, a checkpoint at epoch 0):
        validate them once before the first step, so the session's history shows where fine-tuning began
        (val_* at epoch 0). ``known``: those figures already summed over ``group`` (proof-of-learning
        validates the starting model too); else collective over ``group``, ranks without a model
        contributing nothing."""
        if self.ckpt is None or self.start != 1:
            return
        if known is None:
            sums = Sums(self.num_classes)
            if model is not None and self.data is not None:
                sums.set_val(evaluate(model, self.data.val, self.kind, self.num_classes))
            known = self.reduce_sums(sums, group)
        metrics = {k: v for k, v in known.metrics(self.kind).items() if k.startswith("val_")}
        if self.is_reporter and metrics:
            for name, value in metrics.items():
                if math.isfinite(value):
                    self.sink.record(name, value, epoch=0, step=0)
            self.say("starting weights (" + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + ")")

    # ------------------------------------------------------------------ reporting

    def report_baseline(self) -> None:
        if self.is_reporter and self.setup.unigram_ppl is not None:
            # a unigram model of the same tokenizer on the same validation text
            self.sink.record("baseline_perplexity", self.setup.unigram_ppl, epoch=self.start - 1, step=0)
            self.latest["baseline_perplexity"] = self.setup.unigram_ppl
            self.say(f"unigram baseline perplexity on validation: {self.setup.unigram_ppl:.1f}")

    def epoch_end(
        self,
        epoch: int,
        step: int,
        glob: Sums,
        seconds: float,
        local: Sums | None,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        final: bool,
        extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Record the global metrics (reporter), refresh node stats, checkpoint when due.

        ``extra``: further global figures of this epoch / round (consensus: rejected_rounds,
        model_spread, raft_commit_index), recorded like the others."""
        metrics = glob.metrics(self.kind)
        if seconds > 0 and glob.train["samples"] > 0:
            metrics["samples_per_s"] = glob.train["samples"] / seconds
            if self.kind in ("text", "lm"):
                metrics["tokens_per_s"] = glob.train["tokens"] / seconds
        metrics["lr"] = float(self.lr if self.lr > 0 else self.job.learning_rate)
        metrics.update(extra or {})
        self.latest.update(metrics)
        if self.job.lr_schedule == "plateau":
            self.plateau.observe(metrics.get("val_loss"))
        if self.is_reporter:
            for name, value in metrics.items():
                if math.isfinite(value):
                    self.sink.record(name, value, epoch=epoch, step=step)
            unit = "round" if self.job.mode == "federated" else "epoch"
            parts = [f"{unit} {epoch}/{self.total}"]
            for name in ("loss", "accuracy", "val_loss", "val_accuracy", "val_f1_macro", "val_perplexity",
                         "samples_per_s", "tokens_per_s", "model_spread", "rejected_rounds", "raft_commit_index"):
                if name in metrics:
                    parts.append(f"{name} {metrics[name]:.4g}")
            self.say(", ".join(parts))
        if self.plan.writes_checkpoints:  # the reporter, or the rank with the checkpoint_creation capability
            is_best, improved = self.judge_checkpoint(metrics)
            due = final or (self.job.checkpoint_every > 0 and epoch % self.job.checkpoint_every == 0)
            on_improvement = self.job.checkpoint_on_improvement is not None and improved
            best = self.job.checkpoint_best and is_best
            if (due or on_improvement or best) and model is not None:
                self.write_checkpoint(epoch, model, optimizer, best=best)
        if local is not None and local.train["count"] > 0:
            self.sink.node_stat("local_loss", local.train["loss_sum"] / local.train["count"])
        self.node_stats()
        return metrics

    def judge_checkpoint(self, metrics: dict[str, float]) -> tuple[bool, bool]:
        """(a new best checkpoint_metric, better than the best so far by checkpoint_on_improvement);
        the best is updated when it is one."""
        name = self.job.checkpoint_metric
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return False, False
        best = self.best_metric
        margin = self.job.checkpoint_on_improvement or 0.0
        if best is None:
            self.best_metric = value
            return True, True
        sign = 1.0 if name in ("val_loss", "val_perplexity") else -1.0  # lower is better for losses
        is_best = sign * value < sign * best
        enough = sign * value < sign * best - margin * abs(best)
        if is_best:
            self.best_metric = value
        return is_best, enough

    def node_stats(self, **extra: float) -> None:
        s = self.sink
        s.node_stat("samples_processed", self.samples_processed)
        if self.steps:
            s.node_stat("mean_step_ms", 1000.0 * self.step_seconds / self.steps)
        s.node_stat("rss_mb", rss_mb())
        s.node_stat("bytes_sent", self.bytes_sent)
        s.node_stat("bytes_received", self.bytes_received)
        s.node_stat("comm_s", self.comm_s)
        if self.checkpoints_created:
            s.node_stat("checkpoints_created", self.checkpoints_created)
        for k, v in extra.items():
            s.node_stat(k, v)

    def write_checkpoint(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                         best: bool = False, extra: dict[str, Any] | None = None) -> None:
        """Write the checkpoint of ``epoch``; ``best``: it becomes the kept best (the previous best may
        then be rotated away); ``extra``: further fields of the file."""
        directory = checkpoint_dir(self.job, self.sandbox)
        keep = self.best_checkpoint if not best else None
        try:
            path, removed = save_checkpoint(
                directory, self.job, epoch, model, optimizer, self.setup.task, self.setup.tokenizer,
                self.setup.label_names, self.setup.max_len, self.latest, self.quota,
                keep=Path(keep) if keep else None, extra=extra,
            )
        except OSError as exc:
            # A full disk must not kill the training: say so and keep going.
            self.say(f"checkpoint at {epoch} could not be written to {directory}: {exc}")
            log.warning("checkpoint failed", exc_info=True)
            return
        for old in removed:
            self.sink.discard_checkpoint(str(old))
        self.sink.add_checkpoint(str(path))
        self.checkpoints_created += 1
        self.last_checkpoint = str(path)
        if best:
            self.best_checkpoint = str(path)
            self.sink.node_stat("best_checkpoint_epoch", epoch)
        self.say(f"checkpoint written: {path}")

    def trained(self, model: nn.Module, local_model: nn.Module | None = None) -> TrainedModel:
        model = model.cpu()  # the node serves, exports and checkpoints from CPU
        model.eval()
        if local_model is not None:
            local_model.eval()
        return TrainedModel(
            model=model,
            task=self.setup.task,
            tokenizer=self.setup.tokenizer,
            label_names=list(self.setup.label_names),
            architecture=self.job.architecture,
            preset=getattr(model, "preset", self.job.model),  # "custom" when a loaded model kept its own shape
            max_len=self.setup.max_len,
            local_model=local_model,
            session_id=self.job.session_id,
            metrics=dict(self.latest),
            checkpoint=self.last_checkpoint,
            epoch=self.epoch,
        )
