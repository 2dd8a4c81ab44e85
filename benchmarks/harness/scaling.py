"""Rows of how the server scales: ``scaling`` (synchronous throughput and efficiency at 1, 2 and 4
workers beside torchrun DDP at the same world sizes) and ``collectives`` (all-reduce, all-gather and
broadcast time and bandwidth per message size in the server's nodes beside bare gloo)."""

from __future__ import annotations

import functools
import os
import statistics

from benchmarks.harness.common import SYNC_ARCH, SYNC_JOB, SYNC_PRESET, TARGETS, BenchError, Row, ratio, say, torchrun
from benchmarks.harness.session import Bench

GLOBAL_BATCH = 128  # split evenly over the workers, so every world size takes the same steps per epoch
COLLECTIVE_OPS = ("all_reduce", "all_gather", "broadcast")
COLLECTIVE_SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
COLLECTIVE_SIZES_QUICK = (4 << 10, 1 << 20)
COLLECTIVE_WORLD = 2
RATIO_FROM_BYTES = 1 << 20  # below this, per-call overheads dominate and the target does not apply


def world_sizes(bench: Bench) -> tuple[int, ...]:
    return (1, 2) if bench.quick else (1, 2, 4)


async def row_scaling(bench: Bench) -> list[Row]:

    epochs = 1 if bench.quick else 2
    reps = 1 if bench.quick else 2
    measured: dict[int, dict[str, list[float]]] = {}
    failed: list[Row] = []
    for workers in world_sizes(bench):
        try:
            measured[workers] = await scaling_runs(bench, workers, epochs, reps)
        except BenchError as exc:  # one world size lost must not lose the others
            failed.append(Row(f"scaling.{workers}", f"sync throughput, {workers} worker(s)", status="failed",
                              reason=str(exc)))
    throughput = {w: {side: GLOBAL_BATCH / (statistics.median(m[side]) / 1000) for side in ("ours", "theirs")}
                  for w, m in measured.items()}
    rows = []
    for workers, m in measured.items():
        ours, theirs = throughput[workers]["ours"], throughput[workers]["theirs"]
        rt = ratio(ours, theirs)
        eff = {side: throughput[workers][side] / (workers * throughput[1][side]) if 1 in throughput else None
               for side in ("ours", "theirs")}
        rows.append(Row(
            f"scaling.{workers}", f"sync throughput, {workers} worker(s), global batch {GLOBAL_BATCH}", "samples/s",
            ours, theirs, rt, f">= {TARGETS['scaling']}", rt is not None and rt >= TARGETS["scaling"],
            f"efficiency (throughput / ({workers} x 1-worker throughput)): ours {fmt(eff['ours'])}, theirs "
            f"{fmt(eff['theirs'])}; MLP large mnist-5k, batch {GLOBAL_BATCH // workers} per worker; median of {reps} "
            f"alternating runs of the slowest rank's mean step (ours {', '.join(f'{x:.1f}' for x in m['ours'])} ms, "
            f"theirs {', '.join(f'{x:.1f}' for x in m['theirs'])} ms) over {int(m['ours_steps'][-1])} / "
            f"{int(m['theirs_steps'][-1])} steps; {os.cpu_count()} cores shared by every process",
            details={"epochs": epochs, "repetitions": reps, "per_worker_batch": GLOBAL_BATCH // workers,
                     "efficiency_ours": eff["ours"], "efficiency_theirs": eff["theirs"],
                     "slowest_mean_step_ms": m}))
    return sorted(rows + failed, key=lambda r: r.key)


async def scaling_runs(bench: Bench, workers: int, epochs: int, reps: int) -> dict[str, list[float]]:
    """Slowest-rank mean step times, ours and torchrun DDP's, alternating ``reps`` times."""
    import anyio

    per_worker = GLOBAL_BATCH // workers
    cid = await bench.cluster(workers)
    base_args = ["--dataset", SYNC_JOB["dataset"], "--architecture", SYNC_ARCH, "--preset", SYNC_PRESET,
                 "--batch-size", str(per_worker), "--epochs", str(epochs),
                 "--lr", str(SYNC_JOB["learning_rate"]), "--seed", str(SYNC_JOB["seed"]),
                 "--validation-split", str(SYNC_JOB["validation_split"])]
    runs: dict[str, list[float]] = {"ours": [], "theirs": [], "ours_steps": [], "theirs_steps": []}
    for rep in range(reps):  # alternate, so both see the same background load
        say(f"scaling: ours, {workers} worker(s) x batch {per_worker}, {epochs} epoch(s) ({rep + 1}/{reps})")
        _, status = await bench.train_sync(cid, epochs, batch_size=per_worker)
        nodes = bench.node_stats(status)
        runs["ours"].append(max(float(n["mean_step_ms"]) for n in nodes.values()))
        runs["ours_steps"].append(float((status.get("live") or {}).get("step") or 0))
        say(f"scaling: theirs, DDP under torchrun, {workers} process(es) ({rep + 1}/{reps})")
        base = await anyio.to_thread.run_sync(functools.partial(torchrun, "ddp_baseline.py", base_args,
                                                                nproc=workers))
        runs["theirs"].append(max(r["mean_step_ms"] for r in base["ranks"]))
        runs["theirs_steps"].append(float(base["ranks"][0]["steps"]))
    bench.has_model.add(workers)
    return runs


def fmt(x: float | None) -> str:
    return "n/a (no 1-worker figure)" if x is None else f"{x:.2f}"


async def row_collectives(bench: Bench) -> list[Row]:
    sizes = tuple(COLLECTIVE_SIZES_QUICK if bench.quick else COLLECTIVE_SIZES)
    reps, warmup, repetitions = (5, 2, 1) if bench.quick else (10, 3, 2)
    m = await measure_collectives(bench, COLLECTIVE_OPS, sizes, reps, warmup, repetitions)
    bench.shared["collectives"] = m  # the allreduce row reads its slice from here when both run
    rows = [collective_row(m, op, size, f"collectives.{op}.{size}",
                           f"{op.replace('_', '-')} {human_bytes(size)}, world {COLLECTIVE_WORLD}",
                           TARGETS["collectives"], judged=size >= RATIO_FROM_BYTES)
            for op in COLLECTIVE_OPS for size in sizes]
    rows.append(nccl_row())
    return rows


class Collectives:
    """Per-run times (ms, the slowest rank's median) of each (op, bytes), ours and bare gloo's."""

    def __init__(self, reps: int, warmup: int) -> None:
        self.reps, self.warmup = reps, warmup
        self.ours: list[dict[tuple[str, int], float]] = []
        self.theirs: list[dict[tuple[str, int], float]] = []

    def has(self, op: str, sizes: tuple[int, ...]) -> bool:
        return bool(self.ours) and all((op, size) in self.ours[0] for size in sizes)


async def measure_collectives(bench: Bench, ops: tuple[str, ...], sizes: tuple[int, ...], reps: int,
                              warmup: int, repetitions: int) -> Collectives:
    """Time ``ops`` x ``sizes`` in a 2-node cluster's mesh group and under bare gloo, alternating runs."""
    import anyio

    cid = await bench.cluster(COLLECTIVE_WORLD)
    request = {"topologies": ["mesh"], "ops": list(ops), "sizes_bytes": list(sizes), "reps": reps, "warmup": warmup}
    m = Collectives(reps, warmup)
    for rep in range(repetitions):  # alternate, so both see the same background load
        say(f"collectives: ours, {', '.join(ops)} in the {COLLECTIVE_WORLD} nodes' mesh group "
            f"({rep + 1}/{repetitions})")
        figures = await anyio.to_thread.run_sync(lambda: bench.service.collective_benchmark(cid, request))
        m.ours.append({(f.op, f.bytes): f.time_ms for f in figures})
        say(f"collectives: theirs, bare gloo under torchrun ({rep + 1}/{repetitions})")
        base = await anyio.to_thread.run_sync(lambda: torchrun("gloo_baseline.py", [
            "--sizes", *map(str, sizes), "--reps", str(reps), "--warmup", str(warmup), "--ops", *ops],
            nproc=COLLECTIVE_WORLD))
        m.theirs.append({(r["op"], r["bytes"]): r["time_ms"] for r in base["results"]})
    return m


def collective_row(m: Collectives, op: str, size: int, key: str, label: str, target: float, judged: bool) -> Row:
    """One (op, size) line: bandwidth from the median time of each side's runs, and the ratio."""
    o = [run[(op, size)] for run in m.ours if (op, size) in run]
    t = [run[(op, size)] for run in m.theirs if (op, size) in run]
    if not o or not t:
        return Row(key, label, status="failed",
                   reason=f"no {'server' if not o else 'baseline'} figure for {op} of {size} bytes")
    ours_bw, theirs_bw = mbps(size, statistics.median(o)), mbps(size, statistics.median(t))
    rt = ratio(ours_bw, theirs_bw)
    return Row(key, label, "Mbit/s", ours_bw, theirs_bw, rt, f">= {target}" if judged else "",
               (rt is not None and rt >= target) if judged else None,
               f"time ms: ours {statistics.median(o):.2f}, theirs {statistics.median(t):.2f} (slowest rank's median "
               f"of {m.reps} after {m.warmup} warm-up; median of {len(o)} alternating runs)",
               details={"ours_ms": o, "theirs_ms": t})


def nccl_row() -> Row:
    """NCCL figures need one GPU per rank; on this machine's kind there is none (or one)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = ("no GPU on this machine" if gpus == 0 else
           f"{gpus} GPU(s) here; NCCL needs one GPU per rank, so a world of {COLLECTIVE_WORLD} needs "
           f"{COLLECTIVE_WORLD}" if gpus < COLLECTIVE_WORLD else
           "NCCL collective rows are not built yet (the nodes' benchmark times CPU tensors over gloo)")
    return Row("collectives.nccl", "NCCL all-reduce / all-gather / broadcast", status="skipped", reason=why)


def mbps(nbytes: int, ms: float) -> float:
    if ms <= 0:
        raise BenchError(f"a collective of {nbytes} bytes reported a time of {ms} ms")
    return nbytes * 8 / (ms / 1000) / 1e6


def human_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
