"""Service-level objectives of a stable release, checked over the last predictions a serving cluster
answered: a breach (error rate or p95 latency over the window) rolls ``stable`` back."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_error_rate: float = Field(0.1, ge=0, le=1, description=(
        "Most failed predictions (a node failing, not the caller's bad input) per window"))
    max_p95_ms: float = Field(5000.0, gt=0, le=600_000, description=(
        "Most p95 latency of the window's predictions, ms (measured by the server around each call)"))
    window: int = Field(20, ge=3, le=10_000, description="Predictions the objectives are judged over")


class SloWindows:
    """The last predictions of each cluster: (latency ms, failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, deque[tuple[float, bool]]] = {}

    def record(self, cluster_id: str, latency_ms: float, failed: bool, window: int) -> list[tuple[float, bool]]:
        """Add one prediction; the full window (empty until it has ``window`` predictions)."""
        with self._lock:
            seen = self._windows.get(cluster_id)
            if seen is None or seen.maxlen != window:
                seen = self._windows[cluster_id] = deque(seen or (), maxlen=window)
            seen.append((latency_ms, failed))
            return list(seen) if len(seen) == window else []

    def reset(self, cluster_id: str) -> None:
        with self._lock:
            self._windows.pop(cluster_id, None)


def breach(seen: list[tuple[float, bool]], slo: Slo) -> str | None:
    """Which objective the window breaks, in words; None when it keeps both (or is not full)."""
    if not seen:
        return None
    rate = sum(failed for _, failed in seen) / len(seen)
    if rate > slo.max_error_rate:
        return f"error rate {rate:.2f} over the last {len(seen)} predictions is above {slo.max_error_rate}"
    ok = [ms for ms, failed in seen if not failed]
    p95 = float(np.percentile(ok, 95)) if ok else 0.0
    if p95 > slo.max_p95_ms:
        return f"p95 latency {p95:.1f} ms over the last {len(seen)} predictions is above {slo.max_p95_ms} ms"
    return None
