"""Federated rows: ``federated`` (FedAvg 4 clients x 5 rounds on digits vs Flower's simulation
engine in a side venv) and ``byzantine`` (accuracy with one noisy worker, robust rules vs plain FedAvg)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from benchmarks.harness.common import (
    BENCH_DIR,
    FED_JOB,
    FED_LAYERS,
    FLOWER_HINT,
    BenchError,
    Row,
    ratio,
    run_script,
    say,
)
from benchmarks.harness.session import Bench


async def row_federated(bench: Bench) -> list[Row]:
    from flow_nexus_server.states import SessionState

    rounds = 2 if bench.quick else 5
    say(f"federated: 4 workers + 1 aggregator, {rounds} rounds on digits, 64-64-10")
    t_setup = time.perf_counter()
    cid = (await bench.tool("neural_cluster_init", {"name": "bench-fed", "topology": "star",
                                                    "architecture": "mlp"}))["cluster_id"]
    try:
        for role, count in (("worker", 4), ("aggregator", 1)):
            await bench.tool("neural_node_deploy", {"cluster_id": cid, "role": role, "count": count,
                                                    "model": "custom", "layers": FED_LAYERS})
        await bench.tool("neural_cluster_connect", {"cluster_id": cid})
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        run = await bench.tool("neural_train_distributed", {"cluster_id": cid, **FED_JOB, "federated": True,
                                                            "rounds": rounds, "wait": True, "wait_timeout_s": 900})
        ours = time.perf_counter() - t0
        status = await bench.tool("neural_training_status", {"session_id": run["session_id"]})
        if status["status"] != SessionState.COMPLETED:
            raise BenchError(f"federated session ended {status['status']}: {status.get('error')}")
        final = status.get("final_metrics") or {}
    finally:
        await bench.tool("neural_cluster_terminate", {"cluster_id": cid})
    details: dict[str, Any] = {"rounds": rounds, "clients": 4, "ours_train_call_s": ours,
                               "ours_deploy_connect_s": setup_s, "ours_val_accuracy": final.get("val_accuracy"),
                               "ours_session": run["session_id"]}
    row = Row("federated", f"FedAvg 4 clients x {rounds} rounds, digits 64-64-10", "s", ours, note=(
        f"ours: train call to completion, nodes already up (deploy+connect {setup_s:.1f} s more); "
        "theirs: run_simulation call (starts Ray and its actors)"), details=details)
    fl, why = await flower_baseline(bench, rounds, [])
    if fl is None:
        row.note, row.reason = (f"theirs {why}" if why == FLOWER_HINT else why), why
        return [row]
    row.theirs = fl["run_simulation_s"]
    row.ratio = ratio(ours, row.theirs)
    row.details["flower"] = fl
    acc = (fl.get("final_eval") or {}).get("eval_acc")
    if acc is not None and final.get("val_accuracy") is not None:
        row.note += f"; final val accuracy ours {final['val_accuracy']:.3f}, Flower {acc:.3f}"
    return [row]


async def flower_baseline(bench: Bench, rounds: int, extra: list[str]) -> tuple[dict[str, Any] | None, str]:
    """``benchmarks/flower_baseline.py`` (4 clients, FED_JOB, ``extra`` arguments) with the
    ``--flower-python`` interpreter: (its JSON result, "") or (None, why it did not run)."""
    import anyio

    py = bench.args.flower_python
    if not py:
        return None, FLOWER_HINT
    try:
        check = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [py, "-c", "import flwr, torch; print(flwr.__version__)"], capture_output=True, text=True,
            timeout=120))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, FLOWER_HINT + f" ({py}: {exc})"
    if check.returncode != 0:
        return None, FLOWER_HINT + f" ({py} cannot import flwr/torch)"
    say(f"Flower {check.stdout.strip()} run_simulation {' '.join(extra)}")
    try:
        fl = await anyio.to_thread.run_sync(lambda: run_script(
            [py, str(BENCH_DIR / "flower_baseline.py"), "--clients", "4", "--rounds", str(rounds),
             "--local-epochs", str(FED_JOB["local_epochs"]), "--batch-size", str(FED_JOB["batch_size"]),
             "--lr", str(FED_JOB["learning_rate"]), "--dataset", FED_JOB["dataset"],
             "--layers", json.dumps(FED_LAYERS), "--seed", str(FED_JOB["seed"]), *extra], 900,
            marker="FLOWER_BASELINE_JSON"))
    except BenchError as exc:
        return None, f"Flower baseline failed: {exc}"
    return fl, ""


async def row_byzantine(bench: Bench) -> list[Row]:
    """Issue 5's attack scenario: digits, 4 workers + aggregator, one worker sends w + 50·N(0,1)."""
    say("byzantine: 3 honest workers + 1 gaussian_noise(50) worker + aggregator, digits, 5 rounds")
    cid = (await bench.tool("neural_cluster_init", {"name": "bench-byz", "topology": "star",
                                                    "architecture": "mlp"}))["cluster_id"]
    results: dict[str, float] = {}
    try:
        await bench.tool("neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
        await bench.tool("neural_node_deploy", {"cluster_id": cid, "count": 3})
        await bench.tool("neural_node_deploy", {"cluster_id": cid, "behavior": "gaussian_noise",
                                                "behavior_scale": 50})
        await bench.tool("neural_cluster_connect", {"cluster_id": cid})
        job = {"cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 5, "local_epochs": 1,
               "batch_size": 8, "learning_rate": 0.01, "wait": True, "wait_timeout_s": 600}
        runs = {
            "fedavg (plain)": {"consensus": "proof-of-learning", "pol_tolerance": 1e9},
            "krum f=1": {"consensus": "byzantine", "aggregation_rule": "krum", "byzantine_f": 1},
            "median": {"consensus": "byzantine", "aggregation_rule": "median"},
            "trimmed mean 0.25": {"consensus": "byzantine", "aggregation_rule": "trimmed_mean", "trim_beta": 0.25},
        }
        for name, extra in runs.items():
            run = await bench.tool("neural_train_distributed", {**job, **extra})
            results[name] = float(run["result"]["metrics"]["val_accuracy"])
    finally:
        await bench.tool("neural_cluster_terminate", {"cluster_id": cid})
    plain = results["fedavg (plain)"]
    return [Row("byzantine", f"val accuracy under attack, {name}", "acc", acc, theirs=plain,
                ratio=ratio(acc, plain), target=">= 0.90" if name != "fedavg (plain)" else "",
                met=(acc >= 0.90) if name != "fedavg (plain)" else None,
                note="theirs = plain FedAvg with the same noisy worker", details={"all": results})
            for name, acc in results.items()]
