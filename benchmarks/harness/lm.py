"""Rows of the language model: ``lm_sync`` (GPT-2 training step time vs the same transformers model
under plain DDP with torchrun) and ``generate`` (tokens/s of greedy ensemble decoding through 1, 2
and 4 nodes)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.harness.common import TARGETS, BenchError, Row, ratio, say, torchrun
from benchmarks.harness.session import Bench

LM_PRESET = "base"
LM_JOB = {"dataset": "bbc-news-lm", "batch_size": 16, "optimizer": "sgd", "learning_rate": 0.05, "seed": 0,
          "validation_split": 0.2}
PROMPT = "The future of artificial intelligence is"


async def lm_cluster(bench: Bench, workers: int) -> str:
    """A cluster of ``workers`` transformer nodes (created once per size)."""
    clusters: dict[int, str] = bench.shared.setdefault("lm_clusters", {})
    if workers not in clusters:
        say(f"creating a {workers}-node language-model cluster (transformer/{LM_PRESET})")
        cid = (await bench.tool("neural_cluster_init", {"name": f"bench-lm-{workers}", "topology": "mesh",
                                                        "architecture": "transformer"}))["cluster_id"]
        await bench.tool("neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": workers,
                                                "model": LM_PRESET})
        await bench.tool("neural_cluster_connect", {"cluster_id": cid})
        clusters[workers] = cid
    return clusters[workers]


async def train_lm(bench: Bench, epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    cid = await lm_cluster(bench, 2)
    run, status = await bench.train_sync(cid, epochs, **LM_JOB, architecture="transformer")
    bench.shared["lm_model"] = status
    for c in status.get("checkpoints") or []:
        if not c["deleted"]:
            bench.shared["lm_checkpoint"] = c["checkpoint_id"]
    return run, status


async def row_lm_sync(bench: Bench) -> list[Row]:
    import anyio

    reps = 1 if bench.quick else 3
    ours_runs: list[float] = []
    theirs_runs: list[float] = []
    args = ["--dataset", LM_JOB["dataset"], "--architecture", "transformer", "--preset", LM_PRESET,
            "--batch-size", str(LM_JOB["batch_size"]), "--epochs", "1", "--lr", str(LM_JOB["learning_rate"]),
            "--seed", str(LM_JOB["seed"]), "--validation-split", str(LM_JOB["validation_split"])]
    steps = None
    for rep in range(reps):  # alternate, so both see the same background load
        say(f"lm_sync: ours, GPT-2 {LM_PRESET} on {LM_JOB['dataset']}, 2 workers, 1 epoch ({rep + 1}/{reps})")
        _, status = await train_lm(bench, 1)
        nodes = bench.node_stats(status)
        ours_runs.append(max(float(n["mean_step_ms"]) for n in nodes.values()))
        steps = (status.get("live") or {}).get("step")
        say(f"lm_sync: theirs, the same transformers model under torchrun DDP ({rep + 1}/{reps})")
        base = await anyio.to_thread.run_sync(lambda: torchrun("ddp_baseline.py", args, timeout=900))
        theirs_runs.append(max(r["mean_step_ms"] for r in base["ranks"]))
    ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
    rt = ratio(ours, theirs)
    return [Row("lm_sync", f"LM train step, GPT-2 {LM_PRESET} {LM_JOB['dataset']}, 2 workers, batch "
                           f"{LM_JOB['batch_size']}x128", "ms", ours, theirs, rt, f"<= {TARGETS['lm_sync']}",
                rt is not None and rt <= TARGETS["lm_sync"],
                f"median of {reps} alternating runs; mean step of the slowest rank ({steps} steps ours), timed "
                "zero_grad..optimizer.step in both; theirs: transformers GPT2LMHeadModel in DistributedDataParallel "
                "(benchmarks/ddp_baseline.py), same BPE, windows, batch and SGD",
                details={"ours_runs_ms": ours_runs, "theirs_runs_ms": theirs_runs})]


async def ensure_lm(bench: Bench, workers: int) -> str:
    """The ``workers``-node LM cluster serving the benchmark language model."""
    cid = await lm_cluster(bench, workers)
    loaded: set[int] = bench.shared.setdefault("lm_loaded", set())
    if workers in loaded:
        return cid
    if "lm_checkpoint" not in bench.shared:
        say("training the shared language model (1 epoch) on the 2-node LM cluster")
        await train_lm(bench, 1)
        loaded.add(2)
        if "lm_checkpoint" not in bench.shared:
            raise BenchError("the LM training session left no checkpoint to load into the other clusters")
    if workers not in loaded:
        await bench.tool("neural_model_load", {"cluster_id": cid, "path": bench.shared["lm_checkpoint"]})
        loaded.add(workers)
    return cid


async def row_generate(bench: Bench) -> list[Row]:
    runs = 2 if bench.quick else 5
    rows = []
    for n in (1, 2, 4):
        cid = await ensure_lm(bench, n)
        say(f"generate: {runs} greedy ensemble decodings of 32 tokens through {n} node(s)")
        args = {"cluster_id": cid, "input_data": PROMPT, "aggregation": "ensemble", "max_new_tokens": 32,
                "temperature": 0}
        await bench.tool("neural_predict_distributed", {**args, "max_new_tokens": 4})  # warm-up
        rates, texts = [], set()
        for _ in range(runs):
            t0 = time.perf_counter()
            reply = await bench.tool("neural_predict_distributed", args)
            took = time.perf_counter() - t0
            rates.append(reply["details"][0]["new_tokens"] / took)
            texts.add(reply["prediction"])
            if reply["nodes_used"] != n:
                raise BenchError(f"generation on the {n}-node cluster used {reply['nodes_used']} nodes")
        rows.append(Row(f"generate.{n}", f"greedy generation through {n} node(s) (ensemble), 32 tokens", "tok/s",
                        statistics.median(rates),
                        note=f"median of {runs} runs after a warm-up, timed by the client around the tool call; "
                             f"{'deterministic' if len(texts) == 1 else 'TEXTS DIFFERED'}; every token is one "
                             "step on every node (KV cache) plus the server's averaging",
                        details={"tokens_per_second": rates, "cluster_id": cid}))
    return rows
