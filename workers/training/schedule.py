"""Learning-rate schedules (the job's ``lr_schedule``): a factor of the job's learning rate for
each optimizer step, and for ``plateau`` a factor that drops when validation stops improving."""

from __future__ import annotations

import math

LR_FLOOR = 0.1
"""cosine and warmup_cosine decay the learning rate to this fraction of the job's ``learning_rate``."""
MAX_WARMUP_STEPS = 100
STEP_MILESTONES = (0.5, 0.75)
"""step: the learning rate is multiplied by STEP_GAMMA at these fractions of the steps."""
STEP_GAMMA = 0.1
PLATEAU_PATIENCE = 2
"""plateau: epochs / rounds without a better val_loss before the learning rate is halved."""
PLATEAU_FACTOR = 0.5
PLATEAU_MIN = 1e-3


def warmup_length(total: int, warmup_steps: int | None) -> int:
    """Warm-up steps of warmup_cosine: the job's, else 5% of the steps (at most MAX_WARMUP_STEPS)."""
    if warmup_steps is not None:
        return min(max(0, warmup_steps), total)
    return max(1, min(MAX_WARMUP_STEPS, total // 20))


def lr_factor(step: int, total: int, schedule: str = "warmup_cosine", warmup_steps: int | None = None) -> float:
    """Factor of the learning rate at optimizer step ``step`` (0-based) of ``total``."""
    total = max(1, int(total))
    if schedule in ("constant", "plateau"):
        return 1.0
    if schedule == "step":
        return STEP_GAMMA ** sum(step >= m * total for m in STEP_MILESTONES)
    warm = warmup_length(total, warmup_steps) if schedule == "warmup_cosine" else 0
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Plateau:
    """plateau: halves a factor after PLATEAU_PATIENCE evaluations without a lower val_loss."""

    def __init__(self) -> None:
        self.factor = 1.0
        self.best = math.inf
        self.waited = 0

    def observe(self, val_loss: float | None) -> None:
        if val_loss is None or not math.isfinite(val_loss):
            return
        if val_loss < self.best:
            self.best, self.waited = val_loss, 0
            return
        self.waited += 1
        if self.waited >= PLATEAU_PATIENCE:
            self.factor, self.waited = max(PLATEAU_MIN, self.factor * PLATEAU_FACTOR), 0
