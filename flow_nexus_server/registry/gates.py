"""Promotion gates: a candidate against the current ``stable`` (or absolute floors for a first release).
Pure functions of two evaluation reports and two contracts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GateOptions(BaseModel):
    """Thresholds of the gates; the defaults are the registry's policy."""

    model_config = ConfigDict(extra="forbid")

    quality_tolerance: float = Field(0.0, ge=0, le=1, description=(
        "Quality gate: accuracy may be at most this much below stable's"))
    latency_factor: float = Field(1.2, ge=1, le=100, description="Latency gate: p95 <= stable's p95 x this")
    robustness_tolerance: float = Field(0.0, ge=0, le=1, description=(
        "Safety gate: accuracy under the fixed perturbation may be at most this much below stable's"))
    min_accuracy: float = Field(0.5, ge=0, le=1, description="First release (no stable yet): accuracy floor")
    max_latency_p95_ms: float = Field(2000.0, gt=0, le=600_000, description=(
        "First release: p95 latency ceiling, ms"))
    min_robustness: float = Field(0.0, ge=0, le=1, description="First release: robustness floor")


def gate(name: str, passed: bool, value: Any, threshold: Any, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "value": value, "threshold": threshold, "detail": detail}


def run_gates(candidate: dict[str, Any], contract: dict[str, Any], stable: dict[str, Any] | None,
              stable_contract: dict[str, Any] | None, options: GateOptions) -> list[dict[str, Any]]:
    """quality, latency, compatibility and safety, in that order. ``candidate`` / ``stable`` are
    evaluation reports on the same dataset; ``stable`` None means a first release (floors)."""
    acc, p95, robust = candidate["accuracy"], candidate["latency_p95_ms"], candidate["robustness"]
    if stable is None:
        q_min, lat_max, r_min = options.min_accuracy, options.max_latency_p95_ms, options.min_robustness
        against = "the floor for a first release"
    else:
        q_min = stable["accuracy"] - options.quality_tolerance
        lat_max = stable["latency_p95_ms"] * options.latency_factor
        r_min = stable["robustness"] - options.robustness_tolerance
        against = "stable"
    changed = [] if stable_contract is None else \
        [part for part in ("input", "labels", "tokenizer_sha256") if contract.get(part) != stable_contract.get(part)]
    nan = bool(candidate.get("nan_outputs"))
    return [
        gate("quality", acc >= q_min, acc, q_min, f"accuracy {acc:.4f} against {q_min:.4f} ({against})"),
        gate("latency", p95 <= lat_max, p95, lat_max, f"p95 {p95:.1f} ms against {lat_max:.1f} ms ({against})"),
        gate("compatibility", not changed, "same" if not changed else "changed: " + ", ".join(changed),
             "same input spec, label set and tokenizer as stable",
             "first release: nothing to be compatible with" if stable_contract is None else
             ("same contract as stable" if not changed else
              f"{', '.join(changed)} differ from stable's (a major version: publish it under a new name)")),
        gate("safety", robust >= r_min and not nan, robust, r_min,
             "outputs hold NaN" if nan else
             f"accuracy under perturbation {robust:.4f} against {r_min:.4f} ({against})"),
    ]
