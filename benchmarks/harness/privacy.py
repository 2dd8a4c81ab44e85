"""Privacy rows: accuracy and round time of federated runs with local differential privacy (the
noise opacus calibrates for epsilon 3 over the run), with central differential privacy (epsilon 3,
beside Flower's central DP with the same noise and clipping when ``--flower-python`` is given)
and with secure aggregation, beside plain FedAvg on the same cluster, job and data (digits,
4 workers + aggregator, 64-64-10)."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.harness.common import FED_JOB, FED_LAYERS, BenchError, Row, ratio, say
from benchmarks.harness.federated import flower_baseline
from benchmarks.harness.session import Bench

TARGET_EPSILON = 3.0
ROUND_NOTE = ("round time = session elapsed / rounds, setup included (plain runs first and loads the data; "
              "local DP also imports opacus on every node)")
MAX_GRAD_NORM = 1.0


def noise_for(target_epsilon: float, shard: int, batch_size: int, rounds: int, local_epochs: int) -> float:
    """The noise multiplier that spends ``target_epsilon`` (delta 1e-5) over the whole run:
    opacus' own calibration (``get_noise_multiplier``) for the Poisson rate the workers use."""
    from opacus.accountants.utils import get_noise_multiplier

    from workers.privacy import steps_per_epoch

    q = batch_size / shard
    return _up(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=1e-5, sample_rate=q,
                                    steps=rounds * local_epochs * steps_per_epoch(q), accountant="rdp"))


def central_noise_for(target_epsilon: float, rounds: int) -> float:
    """Central DP: every worker's update is in every round (sampling rate 1), one Gaussian
    mechanism per round; opacus' calibration again (delta 1e-5: min(1e-5, 1/4 workers))."""
    from opacus.accountants.utils import get_noise_multiplier

    return _up(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=1e-5, sample_rate=1.0,
                                    steps=rounds, accountant="rdp"))


def _up(noise: float) -> float:
    """Four decimals, rounded up: less noise than calibrated would overspend target_epsilon, and
    the session would then stop a round early."""
    return math.ceil(noise * 1e4) / 1e4


async def row_privacy(bench: Bench) -> list[Row]:
    rounds = 2 if bench.quick else 5
    workers = 4
    say(f"privacy: {workers} workers + 1 aggregator, {rounds} rounds on digits: plain, local and central DP "
        f"(epsilon {TARGET_EPSILON:g}), secure aggregation")
    cid = (await bench.tool("neural_cluster_init", {"name": "bench-privacy", "topology": "star",
                                                    "architecture": "mlp"}))["cluster_id"]
    results: dict[str, dict[str, Any]] = {}
    try:
        for role, count in (("worker", workers), ("aggregator", 1)):
            await bench.tool("neural_node_deploy", {"cluster_id": cid, "role": role, "count": count,
                                                    "model": "custom", "layers": FED_LAYERS})
        await bench.tool("neural_cluster_connect", {"cluster_id": cid})
        shard = int(1797 * (1 - FED_JOB["validation_split"])) // workers
        noise = noise_for(TARGET_EPSILON, shard, FED_JOB["batch_size"], rounds, FED_JOB["local_epochs"])
        central_noise = central_noise_for(TARGET_EPSILON, rounds)
        runs = {
            "plain": {},
            "dp": {"differential_privacy": {"mode": "local", "noise_multiplier": noise,
                                            "max_grad_norm": MAX_GRAD_NORM, "target_epsilon": TARGET_EPSILON}},
            "central": {"differential_privacy": {"mode": "central", "noise_multiplier": central_noise,
                                                 "max_grad_norm": MAX_GRAD_NORM, "target_epsilon": TARGET_EPSILON}},
            "secagg": {"secure_aggregation": True},
        }
        for name, extra in runs.items():
            run = await bench.tool("neural_train_distributed", {
                "cluster_id": cid, **FED_JOB, "federated": True, "rounds": rounds, "consensus": "raft",
                "wait": True, "wait_timeout_s": 900, **extra})
            status = await bench.tool("neural_training_status", {"session_id": run["session_id"]})
            if status["status"] != "completed":
                raise BenchError(f"privacy session {name} ended {status['status']}: {status.get('error')}")
            final = status.get("final_metrics") or {}
            results[name] = {"val_accuracy": final.get("val_accuracy"), "round_s": final["elapsed_s"] / rounds,
                             "dp_epsilon": final.get("dp_epsilon"), "secagg_ms": final.get("secagg_ms"),
                             "secagg_bytes_per_worker": final.get("secagg_bytes_per_worker"),
                             "plain_bytes_per_worker": final.get("plain_bytes_per_worker"),
                             "session": run["session_id"]}
    finally:
        await bench.tool("neural_cluster_terminate", {"cluster_id": cid})
    plain, dp, central, sec = results["plain"], results["dp"], results["central"], results["secagg"]
    details = {"rounds": rounds, "workers": workers, "noise_multiplier": noise,
               "central_noise_multiplier": central_noise, "runs": results}
    rows = [
        Row("privacy.dp_accuracy", f"val accuracy, local DP epsilon {TARGET_EPSILON:g} (opacus)", "acc",
            dp["val_accuracy"], theirs=plain["val_accuracy"], ratio=ratio(dp["val_accuracy"], plain["val_accuracy"]),
            note=f"theirs = plain FedAvg; noise_multiplier {noise:.3g}, spent epsilon {dp['dp_epsilon']:.3g}",
            details=details),
        Row("privacy.dp_round", "round time, local DP", "s", dp["round_s"], theirs=plain["round_s"],
            ratio=ratio(dp["round_s"], plain["round_s"]), note=f"theirs = plain FedAvg round; {ROUND_NOTE}",
            details=details),
        Row("privacy.central_dp_accuracy", f"val accuracy, central DP epsilon {TARGET_EPSILON:g}", "acc",
            central["val_accuracy"], theirs=plain["val_accuracy"],
            ratio=ratio(central["val_accuracy"], plain["val_accuracy"]),
            note=(f"theirs = plain FedAvg; noise_multiplier {central_noise:.3g} on the sum of {workers} updates "
                  f"clipped to {MAX_GRAD_NORM:g}, spent epsilon {central['dp_epsilon']:.3g} (user-level: with "
                  f"{workers} users the noise swamps the mean)"), details=details),
        Row("privacy.secagg_accuracy", "val accuracy, secure aggregation", "acc", sec["val_accuracy"],
            theirs=plain["val_accuracy"], ratio=ratio(sec["val_accuracy"], plain["val_accuracy"]),
            note="theirs = plain FedAvg (the unmasked sum equals FedAvg's to 1e-5)", details=details),
        Row("privacy.secagg_round", "round time, secure aggregation", "s", sec["round_s"], theirs=plain["round_s"],
            ratio=ratio(sec["round_s"], plain["round_s"]),
            note=(f"theirs = plain FedAvg round ({ROUND_NOTE}); protocol {sec['secagg_ms']:.0f} ms/round, "
                  f"{sec['secagg_bytes_per_worker']:.0f} B/worker vs {sec['plain_bytes_per_worker']:.0f} B plain"),
            details=details),
        await _flower_dp_row(bench, rounds, central_noise, central),
    ]
    return rows


async def _flower_dp_row(bench: Bench, rounds: int, noise: float, central: dict[str, Any]) -> Row:
    """Our central DP beside Flower's (client-side fixed clipping, server-side noise): the same
    mechanism, noise multiplier and clipping norm on the same shards and initial model."""
    label = f"val accuracy, central DP epsilon {TARGET_EPSILON:g}: ours vs Flower (client-side fixed clipping)"
    fl, why = await flower_baseline(bench, rounds, ["--dp-noise-multiplier", str(noise),
                                                    "--dp-clipping-norm", str(MAX_GRAD_NORM)])
    if fl is None:
        return Row("privacy.flower_dp", label, "acc", central["val_accuracy"], note=why, status="skipped",
                   reason=why, details={})
    theirs = (fl.get("final_eval") or {}).get("eval_acc")
    return Row("privacy.flower_dp", label, "acc", central["val_accuracy"], theirs=theirs,
               ratio=ratio(central["val_accuracy"], theirs),
               note=(f"theirs = Flower {fl.get('flwr')} DifferentialPrivacyClientSideFixedClipping + "
                     f"fixedclipping_mod, noise_multiplier {noise:.3g}, clipping_norm {MAX_GRAD_NORM:g}; "
                     "Flower reports no epsilon; "
                     f"run_simulation {fl['run_simulation_s']:.1f} s, ours {central['round_s'] * rounds:.1f} s"),
               details={"flower": fl})
