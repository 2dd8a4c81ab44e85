"""Rows of the synchronous job: ``sync`` (step time vs plain DDP under torchrun), ``bytes``
(bytes sent per node per step, each topology) and ``allreduce`` (mesh all-reduce bandwidth in
our nodes vs bare gloo under torchrun: the all-reduce slice of ``collectives`` in scaling.py)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness.common import SYNC_ARCH, SYNC_JOB, SYNC_PRESET, TARGETS, BenchError, Row, ratio, say, torchrun
from benchmarks.harness.session import Bench

TOPOLOGIES = ("mesh", "ring", "star", "hierarchical")
COUNTED = {  # how workers/comm.py counts each topology's bytes
    "mesh": "gloo all_reduce: counted with the reducer's ring model (gloo does not expose its traffic)",
    "ring": "send/recv: counted message by message",
    "star": "send/recv: counted message by message",
    "hierarchical": "gloo reduce/all_reduce/broadcast: counted with the reducer's stated model",
}


async def row_sync(bench: Bench) -> list[Row]:
    import anyio

    epochs = 2 if bench.quick else 5
    reps = 1 if bench.quick else 5
    cid = await bench.cluster(2)
    ours_runs: list[dict[str, Any]] = []
    theirs_runs: list[dict[str, Any]] = []
    extras_runs: list[float] = []
    base_args = ["--dataset", SYNC_JOB["dataset"], "--architecture", SYNC_ARCH, "--preset", SYNC_PRESET,
                 "--batch-size", str(SYNC_JOB["batch_size"]), "--epochs", str(epochs),
                 "--lr", str(SYNC_JOB["learning_rate"]), "--seed", str(SYNC_JOB["seed"]),
                 "--validation-split", str(SYNC_JOB["validation_split"])]
    for rep in range(reps):  # alternate, so both see the same background load
        say(f"sync: ours, 2 workers mesh, {epochs} epochs (repetition {rep + 1}/{reps})")
        run, status = await bench.train_sync(cid, epochs)
        nodes = bench.node_stats(status)
        means = [float(n["mean_step_ms"]) for n in nodes.values()]
        live = status.get("live") or {}
        ours_runs.append({"session_id": run["session_id"], "mean_step_ms_per_node": means,
                          "slowest_mean_step_ms": max(means), "steps": live.get("step"),
                          "samples_processed": [n.get("samples_processed") for n in nodes.values()],
                          "rss_mb": [n.get("rss_mb") for n in nodes.values()],
                          "val_accuracy": (status.get("final_metrics") or {}).get("val_accuracy")})
        bench.has_model.add(2)
        say(f"sync: theirs, plain DDP under torchrun (repetition {rep + 1}/{reps})")
        base = await anyio.to_thread.run_sync(lambda: torchrun("ddp_baseline.py", base_args))
        ranks = base["ranks"]
        theirs_runs.append({**base, "slowest_mean_step_ms": max(r["mean_step_ms"] for r in ranks),
                            "slowest_median_step_ms": max(r["median_step_ms"] for r in ranks)})
        if not bench.quick:
            say(f"sync: theirs with the trainer's per-step bookkeeping, diagnostic (repetition {rep + 1}/{reps})")
            run_x = await anyio.to_thread.run_sync(
                lambda: torchrun("ddp_baseline.py", [*base_args, "--trainer-extras"]))
            extras_runs.append(max(r["mean_step_ms"] for r in run_x["ranks"]))
    extras = statistics.median(extras_runs) if extras_runs else None
    paired = [o["slowest_mean_step_ms"] / t["slowest_mean_step_ms"] for o, t in zip(ours_runs, theirs_runs)]
    ours = statistics.median(r["slowest_mean_step_ms"] for r in ours_runs)
    theirs = statistics.median(r["slowest_mean_step_ms"] for r in theirs_runs)
    bench.shared["ddp_peak_rss_mb"] = max(r["peak_rss_mb"] for t in theirs_runs for r in t["ranks"])
    steps_ours = ours_runs[-1]["steps"]
    steps_theirs = theirs_runs[-1]["ranks"][0]["steps"]
    rt = ratio(ours, theirs)
    note = (f"median of {reps} alternating runs" + (f" (paired ratios {', '.join(f'{p:.2f}' for p in paired)})"
                                                      if reps > 1 else "")
            + f"; mean step of the slowest rank over all {steps_ours} (ours) / {steps_theirs} (theirs) steps, "
            "timed zero_grad..optimizer.step in both; evaluation outside the timer in both; ours also "
            "computes the grad norm, batch metrics and the LR schedule inside its step")
    if extras is not None:
        note += f"; theirs with that bookkeeping too (median): {extras:.1f} ms"
    return [Row("sync", "sync step, MLP large mnist-5k, 2 workers, batch 64", "ms", ours, theirs, rt,
                f"<= {TARGETS['sync']}", rt is not None and rt <= TARGETS["sync"], note,
                details={"epochs": epochs, "repetitions": reps, "ours": ours_runs, "theirs": theirs_runs,
                         "theirs_with_trainer_extras_mean_step_ms": extras, "extras_runs": extras_runs,
                         "paired_ratios": paired,
                         "theirs_median_step_ms": statistics.median(r["slowest_median_step_ms"]
                                                                    for r in theirs_runs)})]


async def row_bytes(bench: Bench) -> list[Row]:
    workers = 2 if bench.quick else 4
    cid = await bench.cluster(workers)
    grad_bytes = parameters(bench) * 4
    rows = []
    for topology in TOPOLOGIES:
        say(f"bytes: 1 epoch on {workers} workers, topology {topology}")
        try:
            await bench.tool("neural_cluster_connect", {"cluster_id": cid, "topology": topology})
            run, status = await bench.train_sync(cid, 1)
            nodes = bench.node_stats(status)
            steps = (status.get("live") or {}).get("step")
            if not steps:
                raise BenchError("the session reported no step count")
            sent = {nid: float(n["bytes_sent"]) / steps for nid, n in nodes.items()}
            received = {nid: float(n["bytes_received"]) / steps for nid, n in nodes.items()}
            mean_sent, busiest = statistics.fmean(sent.values()), max(sent.values())
            rows.append(Row(f"bytes.{topology}", f"bytes sent / step, busiest node, {topology}, {workers} workers",
                            "KB", busiest / 1e3, grad_bytes / 1e3, ratio(busiest, grad_bytes), "",
                            None, f"theirs: one fp32 gradient ({grad_bytes / 1e6:.2f} MB, what each DDP rank "
                                  f"hands its all-reduce); per node "
                                  f"{', '.join(f'{v / 1e3:.0f}' for v in sent.values())} KB (mean "
                                  f"{mean_sent / 1e3:.0f}); {steps} steps; {COUNTED[topology]}",
                            details={"steps": steps, "sent_per_step": sent, "received_per_step": received,
                                     "mean_sent_per_step": mean_sent,
                                     "session_id": run["session_id"], "gradient_bytes": grad_bytes}))
        except BenchError as exc:
            rows.append(Row(f"bytes.{topology}", f"bytes sent / node / step, {topology}", status="failed",
                            reason=str(exc)))
    await bench.tool("neural_cluster_connect", {"cluster_id": cid, "topology": "mesh"})
    bench.has_model.add(workers)
    return rows


def parameters(bench: Bench) -> int:
    """Parameters of the benchmark model (cached: building it once is enough)."""
    if "parameters" not in bench.shared:
        from workers.models import TaskInfo, build_model

        model = build_model(SYNC_ARCH, SYNC_PRESET, TaskInfo("images", (1, 28, 28), 10))
        bench.shared["parameters"] = sum(p.numel() for p in model.parameters())
    return int(bench.shared["parameters"])


async def row_allreduce(bench: Bench) -> list[Row]:
    """The all-reduce slice of the collectives row, judged at 4 MiB against its own target; measured
    here only when the collectives row did not run in this invocation."""
    from benchmarks.harness.scaling import Collectives, collective_row, measure_collectives

    sizes = (64 << 10, 4 << 20)  # both among the collectives row's sizes, so a full run measures once
    m = bench.shared.get("collectives")
    if not (isinstance(m, Collectives) and m.has("all_reduce", sizes)):
        m = await measure_collectives(bench, ("all_reduce",), sizes, reps=20, warmup=5,
                                      repetitions=1 if bench.quick else 3)
    return [collective_row(m, "all_reduce", size, f"allreduce.{size}",
                           f"all-reduce bandwidth {size >> 20} MB, world 2" if size >= 1 << 20 else
                           f"all-reduce bandwidth {size >> 10} KB, world 2",
                           TARGETS["allreduce"], judged=size == 4 << 20)
            for size in (4 << 20, 64 << 10)]
