"""Rows of a trained model: ``predict`` (single-example latency through 1, 2, 4 nodes) and
``memory`` (peak RSS per node)."""

from __future__ import annotations

import json
import time

from benchmarks.harness.common import SYNC_JOB, TARGETS, BenchError, Row, pct, ratio, say
from benchmarks.harness.session import Bench


async def row_predict(bench: Bench) -> list[Row]:
    from workers.data import load_dataset

    runs = 20 if bench.quick else 50
    x0 = load_dataset(SYNC_JOB["dataset"]).X[0].tolist()
    one = json.dumps(x0)
    rows = []
    for n in (1, 2, 4):
        cid = await bench.ensure_model(n)
        say(f"predict: {runs} single-example predictions through {n} node(s)")
        for _ in range(5):  # warm-up
            await bench.tool("neural_predict_distributed", {"cluster_id": cid, "input_data": one, "quantized": False})
        times = []
        used = set()
        for _ in range(runs):
            t0 = time.perf_counter()
            reply = await bench.tool("neural_predict_distributed", {"cluster_id": cid, "input_data": one,
                                                                    "quantized": False})
            times.append((time.perf_counter() - t0) * 1000)
            used.add(reply["nodes_used"])
        if used != {n}:
            raise BenchError(f"predictions on the {n}-node cluster used {sorted(used)} nodes")
        p50, p95 = pct(times, 50), pct(times, 95)
        target = n == 4
        rows.append(Row(f"predict.{n}", f"predict 1 example through {n} node(s), p50", "ms", p50,
                        target=f"< {TARGETS['predict_p50_ms']:.0f} ms" if target else "",
                        met=(p50 < TARGETS["predict_p50_ms"]) if target else None,
                        note=f"p95 {p95:.1f} ms; {runs} runs after 5 warm-up, in-memory MCP client",
                        details={"p50_ms": p50, "p95_ms": p95, "runs": runs, "times_ms": times,
                                 "cluster_id": cid}))
    return rows


async def row_memory(bench: Bench) -> list[Row]:
    rows = []
    for n in (2, 4) if not bench.quick else (2,):
        cid = await bench.ensure_model(n)
        say(f"memory: neural_performance_benchmark(memory) on the {n}-node cluster")
        measured = await bench.tool("neural_performance_benchmark", {"model_id": cid, "benchmark_type": "memory",
                                                                     "runs": 5})
        peaks = [float(x["peak_rss_mb"]) for x in measured.get("nodes") or []]
        if not peaks:
            rows.append(Row(f"memory.{n}", f"peak RSS per node, {n} nodes", status="failed",
                            reason="the benchmark reported no node figures"))
            continue
        ddp = bench.shared.get("ddp_peak_rss_mb")
        rows.append(Row(f"memory.{n}", f"peak RSS per node, {n}-node cluster (max)", "MiB", max(peaks),
                        ddp, ratio(max(peaks), ddp),
                        note=("theirs: plain DDP rank's peak (same model and shard, row sync)" if ddp else
                              "theirs: no DDP baseline figure in this run (it comes from row sync)")
                             + f"; per node {', '.join(f'{p:.0f}' for p in peaks)} MiB",
                        details={"peak_rss_mb": peaks, "nodes": [x.get("node_id") for x in measured["nodes"]]}))
    return rows
