"""``flow-nexus-server bench``: the real server against plain baselines, side by side.

Drives the real MCP server through the in-memory SDK client (``Client(build_server(...))``),
with real node processes, and runs each baseline in the same invocation, then prints one
table (ratios are ours / theirs) and writes every figure to JSON. Rows (``--only`` names):

* ``deploy``    4 nodes to healthy: warm launcher (ours, the server's default) vs one cold
                ``python -m workers.agent`` per node (the launch every plain launcher pays).
* ``sync``      synchronous step time, 2 workers (mesh) vs ``benchmarks/ddp_baseline.py`` under
                torchrun: same model, data shard, batch, optimizer, step count and timer bounds.
* ``bytes``     bytes sent per node per optimizer step for each topology (the nodes' counters).
* ``allreduce`` mesh all-reduce bandwidth inside our nodes (``neural_performance_benchmark``)
                vs ``benchmarks/gloo_baseline.py`` (bare gloo all_reduce under torchrun).
* ``federated`` FedAvg 4 clients x 5 rounds on digits, 64-64-10 MLP: our train call vs
                Flower's simulation engine (``benchmarks/flower_baseline.py`` in a side venv).
* ``predict``   client-measured single-example ``neural_predict_distributed`` through 1, 2, 4 nodes.
* ``status``    ``neural_cluster_status`` latency on a 4-node cluster while it trains
                (in-memory client and the SDK stdio client).
* ``memory``    peak RSS per node (``neural_performance_benchmark`` memory figures).

A figure that could not be measured is reported with the reason, never estimated. The
baseline scripts live in ``benchmarks/`` of a source checkout; rows that need them say so when
the package is installed without it. This module is a command-line program: it writes its
table to stdout and its progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
DEFAULT_JSON = BENCH_DIR / "results" / "bench.json"
ROWS = ("deploy", "sync", "bytes", "allreduce", "federated", "byzantine", "predict", "status", "memory")
TOPOLOGIES = ("mesh", "ring", "star", "hierarchical")
FLOWER_HINT = ("skipped: flwr not installed (pip install flwr[simulation]==1.41.0 in a side venv "
               "and pass --flower-python)")

# The synchronous job of the sync / bytes / predict / status rows (an MLP 784-512-512-512-10).
SYNC_ARCH, SYNC_PRESET = "mlp", "large"
SYNC_JOB = {"dataset": "mnist-5k", "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.05,
            "seed": 0, "validation_split": 0.2}
FED_LAYERS = [{"type": "dense", "units": 64}, {"type": "output"}]  # digits: 64-64-10
FED_JOB = {"dataset": "digits", "batch_size": 32, "optimizer": "adam", "learning_rate": 0.01, "seed": 0,
           "validation_split": 0.2, "local_epochs": 1}

COUNTED = {  # how workers/comm.py counts each topology's bytes
    "mesh": "gloo all_reduce: counted with the reducer's ring model (gloo does not expose its traffic)",
    "ring": "send/recv: counted message by message",
    "star": "send/recv: counted message by message",
    "hierarchical": "gloo reduce/all_reduce/broadcast: counted with the reducer's stated model",
}
TARGETS = {"sync": 1.15, "allreduce": 0.9, "predict_p50_ms": 50.0,
           # neural_cluster_status reads the controller's memory (pushed telemetry): p50 / p95 in-memory,
           # p50 over stdio (a front-end relaying to the controller)
           "status_p50_ms": 5.0, "status_p95_ms": 20.0, "status_stdio_p50_ms": 8.0, "deploy_warm_s": 1.0}


class BenchError(RuntimeError):
    """A row could not be measured; the message says why."""


def say(line: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {line}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- deploy (cold vs warm)
# Shared with benchmarks/deploy_bench.py, which calls these.


def start_node(launcher: Any, spec: Any) -> tuple[Any, float, float]:
    """What the service's ``_start_node`` does: launch, then check /health answers as this node.
    Returns the handle, the launch time and the launch + health time."""
    import httpx

    t0 = time.perf_counter()
    handle = launcher.launch(spec, timeout_s=120)
    launched = time.perf_counter() - t0
    reply = httpx.get(f"http://{handle.host}:{handle.port}/health",
                      headers={"Authorization": f"Bearer {spec.token}"}, timeout=10)
    reply.raise_for_status()
    if reply.json()["node_id"] != spec.node_id:
        raise RuntimeError(f"port {handle.port} answered as {reply.json()['node_id']}")
    return handle, launched, time.perf_counter() - t0


def deploy(launcher: Any, root: Path, nodes: int, tag: str) -> dict[str, Any]:
    """Launch ``nodes`` nodes concurrently (one thread each, as ``deploy_nodes`` does), time
    until all answer /health, then stop them (untimed)."""
    from flow_nexus_server.launchers import NodeSpec
    from flow_nexus_server.launchers.local import parse_process_ref

    token = secrets.token_hex(32)
    specs = [NodeSpec(f"node_{secrets.token_hex(4)}", f"dnc_{tag}", "worker",
                      root / tag / f"n{i}", token) for i in range(nodes)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, nodes)) as pool:
        results = list(pool.map(lambda s: start_node(launcher, s), specs))
    wall = time.perf_counter() - t0
    handles = [h for h, _, _ in results]
    warm_refs = sum(parse_process_ref(h.ref) is not None for h in handles)  # forked: "<pid>@<time>"
    for h in handles:
        if not launcher.terminate(h, grace_s=5):
            raise RuntimeError(f"node {h.node_id} (pid {h.pid}) did not stop")
    return {"wall_s": wall, "per_node_s": [t for _, _, t in results],
            "per_node_launch_s": [t for _, t, _ in results], "forked_nodes": warm_refs}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    return {"runs_s": walls, "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "per_node_median_s": statistics.median(t for r in runs for t in r["per_node_s"]),
            "per_node_launch_median_s": statistics.median(t for r in runs for t in r["per_node_launch_s"])}


def deploy_compare(nodes: int = 4, reps: int = 3) -> dict[str, Any]:
    """Cold (one ``python -m workers.agent`` per node) vs warm (forked by the spawner) deploys
    of ``nodes`` nodes, ``reps`` times each. One untimed cold start first fills the page cache;
    the warm template is started once beforehand and its start-up is reported on its own."""
    from flow_nexus_server.launchers import SubprocessLauncher
    from flow_nexus_server.launchers.warm import WarmSubprocessLauncher

    root = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    try:
        cold = SubprocessLauncher()
        deploy(cold, root, 1, "prime")  # untimed: fills the page cache
        cold_runs = [deploy(cold, root, nodes, f"cold{i}") for i in range(reps)]
        warm = WarmSubprocessLauncher(root / "home")
        t0 = time.perf_counter()
        if not warm.start():
            raise BenchError(f"the warm spawner did not start; see {root / 'home' / 'spawner.log'}")
        template_s = time.perf_counter() - t0
        try:
            warm_runs = [deploy(warm, root, nodes, f"warm{i}") for i in range(reps)]
        finally:
            warm.close()
        if any(r["forked_nodes"] != nodes for r in warm_runs):
            raise BenchError("some warm launches fell back to a cold start; see the spawner log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    c, w = summary(cold_runs), summary(warm_runs)
    return {"nodes": nodes, "repetitions": reps,
            "measured": "wall clock from the first launch until every node answered /health, "
                        "launches concurrent (one thread per node)",
            "cold": c, "warm": w, "warm_template_start_s": template_s, "speedup_median": c["median_s"] / w["median_s"]}


# --------------------------------------------------------------------------- machine facts


def machine_facts() -> dict[str, Any]:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    import psutil

    mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    return {"cores": os.cpu_count(), "torch": torch_version, "python": platform.python_version(),
            "platform": platform.platform(), "memory_gib": mem_gib,
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "time": time.time()}


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table (a row name may yield several lines, e.g. one per topology)."""

    key: str
    label: str
    unit: str = ""
    ours: float | None = None
    theirs: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("key", "label", "unit", "ours", "theirs", "ratio", "target", "met",
                                              "note", "status", "reason", "details")}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def run_script(cmd: list[str], timeout: float, marker: str | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a baseline; its JSON is the last stdout line (after ``marker`` when given)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=full_env)
    except subprocess.TimeoutExpired as exc:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        raise BenchError(f"{script} ran past {timeout:.0f} s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if marker:
        lines = [ln[len(marker):].strip() for ln in lines if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        text = (proc.stderr or proc.stdout).strip().splitlines()
        keys = ("Error", "error:", "terminate called", "Killed", "Signal")
        why = [ln.strip() for ln in text if any(k in ln for k in keys)][:3] or [ln.strip() for ln in text[-3:]]
        raise BenchError(f"{script} exited {proc.returncode}" + (" without a result" if not lines else "")
                         + f": {' | '.join(why)[:400]}")
    return json.loads(lines[-1])


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: float = 300) -> dict[str, Any]:
    path = BENCH_DIR / script
    if not path.exists():
        raise BenchError(f"{path} not found: run the benchmark from a source checkout")
    return run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                       str(path), *args], timeout)


class Bench:
    """Holds the in-memory client and the clusters the rows share."""

    def __init__(self, client: Any, args: argparse.Namespace, home: Path) -> None:
        self.client = client
        self.args = args
        self.quick = bool(args.quick)
        self.home = home
        self.clusters: dict[int, str] = {}  # workers -> cluster id (mlp large, mesh)
        self.has_model: set[int] = set()
        self.checkpoint: str | None = None
        self.shared: dict[str, Any] = {}

    # ------------------------------------------------------------------ tool calls
    async def tool(self, name: str, args: dict[str, Any], client: Any = None) -> dict[str, Any]:
        result = await (client or self.client).call_tool(name, args)
        if result.is_error:
            text = result.content[0].text if result.content else "(no text)"
            raise BenchError(f"{name} failed: {text}")
        return result.structured_content or {}

    async def cluster(self, workers: int) -> str:
        if workers not in self.clusters:
            say(f"creating a {workers}-worker cluster ({SYNC_ARCH}/{SYNC_PRESET})")
            cid = (await self.tool("neural_cluster_init", {"name": f"bench-{workers}", "topology": "mesh",
                                                           "architecture": SYNC_ARCH}))["cluster_id"]
            await self.tool("neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": workers,
                                                   "model": SYNC_PRESET})
            await self.tool("neural_cluster_connect", {"cluster_id": cid})
            self.clusters[workers] = cid
        return self.clusters[workers]

    async def train_sync(self, cid: str, epochs: int, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A synchronous run with wait=true; returns (train reply, training status)."""
        t0 = time.perf_counter()
        run = await self.tool("neural_train_distributed", {"cluster_id": cid, **SYNC_JOB, "epochs": epochs,
                                                           "wait": True, "wait_timeout_s": 900, **extra})
        wall = time.perf_counter() - t0
        status = await self.tool("neural_training_status", {"session_id": run["session_id"]})
        if status["status"] != "completed":
            raise BenchError(f"session {run['session_id']} ended {status['status']}: {status.get('error')}")
        run["client_wall_s"] = wall
        for c in status.get("checkpoints") or []:
            if not c["deleted"]:
                self.checkpoint = c["checkpoint_id"]
        return run, status

    async def ensure_model(self, workers: int) -> str:
        """The cluster of ``workers`` nodes holds the benchmark model (trained or loaded)."""
        cid = await self.cluster(workers)
        if workers in self.has_model:
            return cid
        if self.checkpoint is None:
            two = await self.cluster(2)
            say("training the shared model (1 epoch) on the 2-worker cluster")
            await self.train_sync(two, 1)
            self.has_model.add(2)
            if self.checkpoint is None:
                raise BenchError("the training session left no checkpoint to load into the other clusters")
        if workers not in self.has_model:
            await self.tool("neural_model_load", {"cluster_id": cid, "path": self.checkpoint})
            self.has_model.add(workers)
        return cid

    @staticmethod
    def node_stats(status: dict[str, Any]) -> dict[str, dict[str, float]]:
        live = status.get("live") or {}
        nodes = live.get("nodes") or (status.get("final_metrics") or {}).get("nodes") or {}
        if not nodes:
            raise BenchError(f"session {status['session_id']} reported no per-node stats")
        return nodes

    # ------------------------------------------------------------------ 1. deploy
    async def row_deploy(self) -> list[Row]:
        import anyio

        reps = 1 if self.quick else 3
        say(f"deploy: 4 nodes cold vs warm, {reps} repetition(s)")
        res = await anyio.to_thread.run_sync(lambda: deploy_compare(4, reps))
        warm, cold = res["warm"]["median_s"], res["cold"]["median_s"]
        return [Row("deploy", "deploy 4 nodes to healthy (median wall)", "s", warm, cold, ratio(warm, cold),
                    f"warm <= {TARGETS['deploy_warm_s']:.1f} s", warm <= TARGETS["deploy_warm_s"],
                    f"ours: warm fork (default launcher); theirs: cold process per node; "
                    f"template start once {res['warm_template_start_s']:.2f} s", details=res)]

    # ------------------------------------------------------------------ 2. sync step time
    async def row_sync(self) -> list[Row]:
        import anyio

        epochs = 2 if self.quick else 5
        reps = 1 if self.quick else 5
        cid = await self.cluster(2)
        ours_runs: list[dict[str, Any]] = []
        theirs_runs: list[dict[str, Any]] = []
        extras_runs: list[float] = []
        base_args = ["--dataset", SYNC_JOB["dataset"], "--architecture", SYNC_ARCH, "--preset", SYNC_PRESET,
                     "--batch-size", str(SYNC_JOB["batch_size"]), "--epochs", str(epochs),
                     "--lr", str(SYNC_JOB["learning_rate"]), "--seed", str(SYNC_JOB["seed"]),
                     "--validation-split", str(SYNC_JOB["validation_split"])]
        for rep in range(reps):  # alternate, so both see the same background load
            say(f"sync: ours, 2 workers mesh, {epochs} epochs (repetition {rep + 1}/{reps})")
            run, status = await self.train_sync(cid, epochs)
            nodes = self.node_stats(status)
            means = [float(n["mean_step_ms"]) for n in nodes.values()]
            live = status.get("live") or {}
            ours_runs.append({"session_id": run["session_id"], "mean_step_ms_per_node": means,
                              "slowest_mean_step_ms": max(means), "steps": live.get("step"),
                              "samples_processed": [n.get("samples_processed") for n in nodes.values()],
                              "rss_mb": [n.get("rss_mb") for n in nodes.values()],
                              "val_accuracy": (status.get("final_metrics") or {}).get("val_accuracy")})
            self.has_model.add(2)
            say(f"sync: theirs, plain DDP under torchrun (repetition {rep + 1}/{reps})")
            base = await anyio.to_thread.run_sync(lambda: torchrun("ddp_baseline.py", base_args))
            ranks = base["ranks"]
            theirs_runs.append({**base, "slowest_mean_step_ms": max(r["mean_step_ms"] for r in ranks),
                                "slowest_median_step_ms": max(r["median_step_ms"] for r in ranks)})
            if not self.quick:
                say(f"sync: theirs with the trainer's per-step bookkeeping, diagnostic (repetition {rep + 1}/{reps})")
                run_x = await anyio.to_thread.run_sync(
                    lambda: torchrun("ddp_baseline.py", [*base_args, "--trainer-extras"]))
                extras_runs.append(max(r["mean_step_ms"] for r in run_x["ranks"]))
        extras = statistics.median(extras_runs) if extras_runs else None
        paired = [o["slowest_mean_step_ms"] / t["slowest_mean_step_ms"] for o, t in zip(ours_runs, theirs_runs)]
        ours = statistics.median(r["slowest_mean_step_ms"] for r in ours_runs)
        theirs = statistics.median(r["slowest_mean_step_ms"] for r in theirs_runs)
        self.shared["ddp_peak_rss_mb"] = max(r["peak_rss_mb"] for t in theirs_runs for r in t["ranks"])
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

    # ------------------------------------------------------------------ 3. bytes per step
    async def row_bytes(self) -> list[Row]:
        workers = 2 if self.quick else 4
        cid = await self.cluster(workers)
        grad_bytes = self.parameters() * 4
        rows = []
        for topology in TOPOLOGIES:
            say(f"bytes: 1 epoch on {workers} workers, topology {topology}")
            try:
                await self.tool("neural_cluster_connect", {"cluster_id": cid, "topology": topology})
                run, status = await self.train_sync(cid, 1)
                nodes = self.node_stats(status)
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
        await self.tool("neural_cluster_connect", {"cluster_id": cid, "topology": "mesh"})
        self.has_model.add(workers)
        return rows

    def parameters(self) -> int:
        if "parameters" not in self.shared:
            from workers.models import TaskInfo, build_model

            model = build_model(SYNC_ARCH, SYNC_PRESET, TaskInfo("images", (1, 28, 28), 10))
            self.shared["parameters"] = sum(p.numel() for p in model.parameters())
        return int(self.shared["parameters"])

    # ------------------------------------------------------------------ 4. all-reduce bandwidth
    async def row_allreduce(self) -> list[Row]:
        import anyio

        cid = await self.ensure_model(2)
        sizes = [4 << 20, 256 << 10]
        reps = 1 if self.quick else 3
        ours_runs: list[dict[int, dict[str, Any]]] = []
        theirs_runs: list[dict[int, dict[str, Any]]] = []
        for rep in range(reps):  # alternate, so both see the same background load
            say(f"allreduce: neural_performance_benchmark(comprehensive) on the 2-worker cluster ({rep + 1}/{reps})")
            bench = await self.tool("neural_performance_benchmark", {
                "model_id": cid, "benchmark_type": "comprehensive", "runs": 20 if self.quick else 50})
            self.shared.setdefault("benchmarks", {})[2] = bench
            ours_runs.append({c["bytes"]: c for c in bench.get("collectives") or [] if c["topology"] == "mesh"})
            say(f"allreduce: theirs, bare gloo all_reduce under torchrun ({rep + 1}/{reps})")
            base = await anyio.to_thread.run_sync(lambda: torchrun(
                "gloo_baseline.py", ["--sizes", *map(str, sizes), "--reps", "20", "--warmup", "5"]))
            theirs_runs.append({r["bytes"]: r for r in base["results"]})
        rows = []
        for size in sizes:
            label = (f"all-reduce bandwidth {size >> 20} MB" if size >= 1 << 20 else
                     f"all-reduce bandwidth {size >> 10} KB") + ", world 2"
            o = [run[size] for run in ours_runs if size in run]
            t = [run[size] for run in theirs_runs if size in run]
            if not o or not t:
                rows.append(Row(f"allreduce.{size}", label, status="failed",
                                reason=f"no {'server' if not o else 'baseline'} figure for {size} bytes"))
                continue
            ob = statistics.median(x["algbw_mbps"] for x in o)
            tb = statistics.median(x["algbw_mbps"] for x in t)
            rt = ratio(ob, tb)
            is_main = size == 4 << 20
            o_ms = ", ".join(f"{x['time_ms']:.2f}" for x in o)
            t_ms = ", ".join(f"{x['time_ms']:.2f}" for x in t)
            rows.append(Row(f"allreduce.{size}", label, "Mbit/s", ob, tb, rt,
                            f">= {TARGETS['allreduce']}" if is_main else "",
                            (rt is not None and rt >= TARGETS["allreduce"]) if is_main else None,
                            f"median of {reps} alternating runs; slowest rank's median time: ours {o_ms} ms "
                            f"(mesh averaging all-reduce in the nodes, 5 warm-up + 20 reps), theirs {t_ms} ms "
                            "(5 warm-up + 20 reps)",
                            details={"ours": o, "theirs": t}))
        return rows

    # ------------------------------------------------------------------ 5. federated
    async def row_federated(self) -> list[Row]:
        import anyio

        rounds = 2 if self.quick else 5
        say(f"federated: 4 workers + 1 aggregator, {rounds} rounds on digits, 64-64-10")
        t_setup = time.perf_counter()
        cid = (await self.tool("neural_cluster_init", {"name": "bench-fed", "topology": "star",
                                                       "architecture": "mlp"}))["cluster_id"]
        try:
            for role, count in (("worker", 4), ("aggregator", 1)):
                await self.tool("neural_node_deploy", {"cluster_id": cid, "role": role, "count": count,
                                                       "model": "custom", "layers": FED_LAYERS})
            await self.tool("neural_cluster_connect", {"cluster_id": cid})
            setup_s = time.perf_counter() - t_setup
            t0 = time.perf_counter()
            run = await self.tool("neural_train_distributed", {"cluster_id": cid, **FED_JOB, "federated": True,
                                                               "rounds": rounds, "wait": True, "wait_timeout_s": 900})
            ours = time.perf_counter() - t0
            status = await self.tool("neural_training_status", {"session_id": run["session_id"]})
            if status["status"] != "completed":
                raise BenchError(f"federated session ended {status['status']}: {status.get('error')}")
            final = status.get("final_metrics") or {}
        finally:
            await self.tool("neural_cluster_terminate", {"cluster_id": cid})
        details: dict[str, Any] = {"rounds": rounds, "clients": 4, "ours_train_call_s": ours,
                                   "ours_deploy_connect_s": setup_s, "ours_val_accuracy": final.get("val_accuracy"),
                                   "ours_session": run["session_id"]}
        row = Row("federated", f"FedAvg 4 clients x {rounds} rounds, digits 64-64-10", "s", ours, note=(
            f"ours: train call to completion, nodes already up (deploy+connect {setup_s:.1f} s more); "
            "theirs: run_simulation call (starts Ray and its actors)"), details=details)
        py = self.args.flower_python
        if not py:
            row.note, row.reason = "theirs " + FLOWER_HINT, FLOWER_HINT
            return [row]
        try:
            check = await anyio.to_thread.run_sync(lambda: subprocess.run(
                [py, "-c", "import flwr, torch; print(flwr.__version__)"], capture_output=True, text=True,
                timeout=120))
        except (OSError, subprocess.TimeoutExpired) as exc:
            row.note = row.reason = FLOWER_HINT + f" ({py}: {exc})"
            return [row]
        if check.returncode != 0:
            row.note = row.reason = FLOWER_HINT + f" ({py} cannot import flwr/torch)"
            return [row]
        if not (BENCH_DIR / "flower_baseline.py").exists():
            row.note = row.reason = f"skipped: {BENCH_DIR / 'flower_baseline.py'} not found (source checkout needed)"
            return [row]
        say(f"federated: theirs, Flower {check.stdout.strip()} run_simulation")
        try:
            fl = await anyio.to_thread.run_sync(lambda: run_script(
                [py, str(BENCH_DIR / "flower_baseline.py"), "--clients", "4", "--rounds", str(rounds),
                 "--local-epochs", str(FED_JOB["local_epochs"]), "--batch-size", str(FED_JOB["batch_size"]),
                 "--lr", str(FED_JOB["learning_rate"]), "--dataset", FED_JOB["dataset"],
                 "--layers", json.dumps(FED_LAYERS), "--seed", str(FED_JOB["seed"])], 900,
                marker="FLOWER_BASELINE_JSON"))
        except BenchError as exc:
            row.note = row.reason = f"Flower baseline failed: {exc}"
            return [row]
        row.theirs = fl["run_simulation_s"]
        row.ratio = ratio(ours, row.theirs)
        row.details["flower"] = fl
        acc = (fl.get("final_eval") or {}).get("eval_acc")
        if acc is not None and final.get("val_accuracy") is not None:
            row.note += f"; final val accuracy ours {final['val_accuracy']:.3f}, Flower {acc:.3f}"
        return [row]

    # ------------------------------------------------------------------ 6. predict latency
    async def row_byzantine(self) -> list[Row]:
        """Issue 5's attack scenario: digits, 4 workers + aggregator, one worker sends w + 50·N(0,1)."""
        say("byzantine: 3 honest workers + 1 gaussian_noise(50) worker + aggregator, digits, 5 rounds")
        cid = (await self.tool("neural_cluster_init", {"name": "bench-byz", "topology": "star",
                                                       "architecture": "mlp"}))["cluster_id"]
        results: dict[str, float] = {}
        try:
            await self.tool("neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
            await self.tool("neural_node_deploy", {"cluster_id": cid, "count": 3})
            await self.tool("neural_node_deploy", {"cluster_id": cid, "behavior": "gaussian_noise",
                                                   "behavior_scale": 50})
            await self.tool("neural_cluster_connect", {"cluster_id": cid})
            job = {"cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 5, "local_epochs": 1,
                   "batch_size": 8, "learning_rate": 0.01, "wait": True, "wait_timeout_s": 600}
            runs = {
                "fedavg (plain)": {"consensus": "proof-of-learning", "pol_tolerance": 1e9},
                "krum f=1": {"consensus": "byzantine", "aggregation_rule": "krum", "byzantine_f": 1},
                "median": {"consensus": "byzantine", "aggregation_rule": "median"},
                "trimmed mean 0.25": {"consensus": "byzantine", "aggregation_rule": "trimmed_mean", "trim_beta": 0.25},
            }
            for name, extra in runs.items():
                run = await self.tool("neural_train_distributed", {**job, **extra})
                results[name] = float(run["result"]["metrics"]["val_accuracy"])
        finally:
            await self.tool("neural_cluster_terminate", {"cluster_id": cid})
        plain = results["fedavg (plain)"]
        return [Row("byzantine", f"val accuracy under attack, {name}", "acc", acc, theirs=plain,
                    ratio=ratio(acc, plain), target=">= 0.90" if name != "fedavg (plain)" else "",
                    met=(acc >= 0.90) if name != "fedavg (plain)" else None,
                    note="theirs = plain FedAvg with the same noisy worker", details={"all": results})
                for name, acc in results.items()]

    async def row_predict(self) -> list[Row]:
        from workers.data import load_dataset

        runs = 20 if self.quick else 50
        x0 = load_dataset(SYNC_JOB["dataset"]).X[0].tolist()
        one = json.dumps(x0)
        rows = []
        for n in (1, 2, 4):
            cid = await self.ensure_model(n)
            say(f"predict: {runs} single-example predictions through {n} node(s)")
            for _ in range(5):  # warm-up
                await self.tool("neural_predict_distributed", {"cluster_id": cid, "input_data": one, "quantized": False})
            times = []
            used = set()
            for _ in range(runs):
                t0 = time.perf_counter()
                reply = await self.tool("neural_predict_distributed", {"cluster_id": cid, "input_data": one,
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

    # ------------------------------------------------------------------ 7. status latency
    async def status_while_training(self, client: Any, cid: str, calls: int) -> dict[str, Any]:
        import anyio

        run = await self.tool("neural_train_distributed", {"cluster_id": cid, **SYNC_JOB, "epochs": 200,
                                                           "checkpoint_every": 0}, client)
        sid = run["session_id"]
        try:
            deadline = time.monotonic() + 120
            while True:
                st = await self.tool("neural_training_status", {"session_id": sid}, client)
                live = st.get("live") or {}
                if st["status"] != "running":
                    raise BenchError(f"session {sid} ended {st['status']} before the status calls: {st.get('error')}")
                if live.get("status") == "running" and live.get("step", 0) > 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"session {sid} did not start stepping within 120 s")
                await anyio.sleep(0.2)
            times, steps = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                reply = await self.tool("neural_cluster_status", {"cluster_id": cid}, client)
                times.append((time.perf_counter() - t0) * 1000)
                steps.append((reply.get("training") or {}).get("step"))
                await anyio.sleep(0.05)
            st = await self.tool("neural_training_status", {"session_id": sid}, client)
            if st["status"] != "running":
                raise BenchError(f"session {sid} stopped ({st['status']}) during the status calls")
        finally:
            try:
                await self.tool("neural_training_stop", {"session_id": sid}, client)
            except BenchError as exc:
                say(f"status: stopping {sid}: {exc}")
        return {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "calls": calls, "times_ms": times,
                "training_steps_seen": [steps[0], steps[-1]], "session_id": sid}

    async def row_status(self) -> list[Row]:
        calls = 40 if self.quick else 200
        cid = await self.cluster(4)
        say(f"status: {calls} neural_cluster_status calls on 4 nodes while they train (in-memory)")
        mem = await self.status_while_training(self.client, cid, calls)
        p50, p95 = TARGETS["status_p50_ms"], TARGETS["status_p95_ms"]
        rows = [Row("status.memory", "cluster status, 4 nodes training, in-memory client, p50", "ms", mem["p50_ms"],
                    target=f"p50 <= {p50:.0f} ms, p95 <= {p95:.0f} ms",
                    met=mem["p50_ms"] <= p50 and mem["p95_ms"] <= p95,
                    note=f"p95 {mem['p95_ms']:.1f} ms; {calls} calls, training steps "
                         f"{mem['training_steps_seen'][0]}->{mem['training_steps_seen'][1]}", details=mem)]
        try:
            say("status: the same over stdio (a second server process, its own 4 nodes)")
            std = await self.status_over_stdio(calls)
            rows.append(Row("status.stdio", "cluster status, 4 nodes training, stdio client, p50", "ms",
                            std["p50_ms"], target=f"p50 <= {TARGETS['status_stdio_p50_ms']:.0f} ms",
                            met=std["p50_ms"] <= TARGETS["status_stdio_p50_ms"],
                            note=f"p95 {std['p95_ms']:.1f} ms; {calls} calls, SDK stdio client, server subprocess",
                            details=std))
        except Exception as exc:  # noqa: BLE001 - the row says why it has no figure
            rows.append(Row("status.stdio", "cluster status over stdio", status="failed",
                            reason=f"{type(exc).__name__}: {exc}"))
        return rows

    async def status_over_stdio(self, calls: int) -> dict[str, Any]:
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        home = self.home / "stdio-home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k.startswith("FLOW_NEXUS_") or k in ("PATH", "HOME")}
        env.update({"FLOW_NEXUS_HOME": str(home), "OMP_NUM_THREADS": "1"})
        env.pop("FLOW_NEXUS_DB_URL", None)
        params = StdioServerParameters(command=sys.executable, args=["-m", "flow_nexus_server", "--home", str(home)],
                                       env=env, cwd=str(ROOT))
        # The server's stderr (its log) goes to a file, not into the table's terminal.
        import anyio

        from flow_nexus_server.config import Settings
        from flow_nexus_server.controller.commands import stop_everything

        try:
            with open(home / "server.stderr", "w", encoding="utf-8") as errlog:
                async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=600) as client:
                    cid = (await self.tool("neural_cluster_init", {"name": "bench-stdio", "architecture": SYNC_ARCH},
                                           client))["cluster_id"]
                    await self.tool("neural_node_deploy", {"cluster_id": cid, "count": 4, "model": SYNC_PRESET},
                                    client)
                    await self.tool("neural_cluster_connect", {"cluster_id": cid}, client)
                    try:
                        return await self.status_while_training(client, cid, calls)
                    finally:
                        await self.tool("neural_cluster_terminate", {"cluster_id": cid}, client)
        finally:  # the stdio server is a front-end: its home's controller leaves with what it still holds
            await anyio.to_thread.run_sync(stop_everything, Settings.from_env(home))

    # ------------------------------------------------------------------ 8. memory
    async def row_memory(self) -> list[Row]:
        rows = []
        for n in (2, 4) if not self.quick else (2,):
            cid = await self.ensure_model(n)
            say(f"memory: neural_performance_benchmark(memory) on the {n}-node cluster")
            bench = await self.tool("neural_performance_benchmark", {"model_id": cid, "benchmark_type": "memory",
                                                                     "runs": 5})
            peaks = [float(x["peak_rss_mb"]) for x in bench.get("nodes") or []]
            if not peaks:
                rows.append(Row(f"memory.{n}", f"peak RSS per node, {n} nodes", status="failed",
                                reason="the benchmark reported no node figures"))
                continue
            ddp = self.shared.get("ddp_peak_rss_mb")
            rows.append(Row(f"memory.{n}", f"peak RSS per node, {n}-node cluster (max)", "MiB", max(peaks),
                            ddp, ratio(max(peaks), ddp),
                            note=("theirs: plain DDP rank's peak (same model and shard, row sync)" if ddp else
                                  "theirs: no DDP baseline figure in this run (it comes from row sync)")
                                 + f"; per node {', '.join(f'{p:.0f}' for p in peaks)} MiB",
                            details={"peak_rss_mb": peaks, "nodes": [x.get("node_id") for x in bench["nodes"]]}))
        return rows


# --------------------------------------------------------------------------- table and main


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2g}"


def render(rows: list[Row], machine: dict[str, Any]) -> str:
    head = (f"flow-nexus-server bench  |  {machine['cores']} cores, {machine['memory_gib']} GiB, torch "
            f"{machine['torch']}, Python {machine['python']}  |  load average {machine['load_average_start']} "
            f"at start, {machine.get('load_average_end')} at end")
    cols = ["row", "unit", "ours", "theirs", "ours/theirs", "target", "met", "notes"]
    lines = []
    for r in rows:
        if r.status != "ok":  # no figure: the reason goes in the notes column
            lines.append([r.label, r.unit, r.status, "", "", r.target, "", r.reason])
            continue
        met = "" if r.met is None else ("yes" if r.met else "NO")
        theirs = fmt(r.theirs) if r.theirs is not None else ("skipped" if r.reason else "-")
        lines.append([r.label, r.unit, fmt(r.ours), theirs, fmt(r.ratio), r.target, met, r.note])
    widths = [max(len(c), *(len(str(ln[i])) for ln in lines)) if lines else len(c) for i, c in enumerate(cols)]
    widths[0] = min(widths[0], 58)
    out = [head, "=" * min(200, len(head))]
    out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cols[:-1])) + "  " + cols[-1])
    out.append("  ".join("-" * widths[i] for i in range(len(cols) - 1)) + "  " + "-" * 5)
    for ln in lines:
        out.append("  ".join(str(ln[i]).ljust(widths[i]) for i in range(len(cols) - 1)) + "  " + str(ln[-1]))
    return "\n".join(out)


def quiet_logging(log_file: Path) -> None:
    """The server's log goes to its file; only warnings reach stderr (the table goes to stdout)."""
    import logging

    from flow_nexus_server.logs import setup_logging

    setup_logging(log_file)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr:
            h.setLevel(logging.WARNING)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, on its own parser or on the ``bench`` sub-command's."""
    ap.add_argument("--quick", action="store_true", help="reduced version for CI smoke runs (< 3 minutes)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                    help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument("--only", nargs="+", choices=ROWS, metavar="ROW", help=f"run only these rows: {', '.join(ROWS)}")
    ap.add_argument("--flower-python", metavar="PATH",
                    help="python of a side venv with flwr[simulation]==1.41.0 and torch, for the federated baseline")
    # SUPPRESS: absent, it leaves the main parser's --home (flow-nexus-server --home X bench) alone.
    ap.add_argument("--home", default=argparse.SUPPRESS,
                    help="state home for the benchmark's server (default: a temporary directory, removed after)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(
        prog="benchmarks/run.py", description="Benchmark the real server against plain baselines, side by side.")
    ).parse_args(argv)


async def run_rows(args: argparse.Namespace, home: Path, selected: list[str]) -> list[Row]:
    from mcp import Client

    from flow_nexus_server.config import Settings
    from flow_nexus_server.server import build_server

    rows: list[Row] = []
    # Never a configured FLOW_NEXUS_DB_URL: benchmark clusters stay out of a real database.
    settings = Settings.from_env(home).model_copy(update={"db_url": f"sqlite:///{home / 'state.db'}"})
    server = build_server(settings)
    quiet_logging(settings.log_file)
    async with Client(server, read_timeout_seconds=900) as client:
        bench = Bench(client, args, home)
        fns: dict[str, Callable[[], Awaitable[list[Row]]]] = {
            "deploy": bench.row_deploy, "sync": bench.row_sync, "allreduce": bench.row_allreduce,
            "predict": bench.row_predict, "bytes": bench.row_bytes, "status": bench.row_status,
            "memory": bench.row_memory, "federated": bench.row_federated, "byzantine": bench.row_byzantine,
        }
        # Order: the comparisons that are most sensitive to other load run while fewest nodes exist.
        for name in ("deploy", "sync", "allreduce", "federated", "byzantine", "predict", "bytes", "status", "memory"):
            if name not in selected:
                continue
            t0 = time.perf_counter()
            try:
                got = await fns[name]()
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                say(f"{name} failed: {type(exc).__name__}: {exc}")
                if not isinstance(exc, BenchError):
                    sys.stderr.write(traceback.format_exc())
                why = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
                got = [Row(name, name, status="failed", reason=why)]
            for r in got:
                r.details.setdefault("row_seconds", round(time.perf_counter() - t0, 2))
            rows.extend(got)
        for cid in bench.clusters.values():
            try:
                await bench.tool("neural_cluster_terminate", {"cluster_id": cid})
            except BenchError as exc:
                say(f"terminating {cid}: {exc}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the selected rows, print the table, write the JSON; 1 when a row failed."""
    import anyio

    selected = list(dict.fromkeys(args.only or ROWS))
    machine = machine_facts()
    given_home = getattr(args, "home", None)
    home = Path(given_home).expanduser().resolve() if given_home else Path(tempfile.mkdtemp(prefix="fn-bench-"))
    say(f"state home {home}; rows {', '.join(selected)}{' (quick)' if args.quick else ''}")
    t0 = time.perf_counter()
    try:
        rows = anyio.run(run_rows, args, home, selected)
    finally:
        if not given_home:
            shutil.rmtree(home, ignore_errors=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["wall_s"] = round(time.perf_counter() - t0, 1)
    table = render(rows, machine)
    sys.stdout.write(table + "\n")
    result = {"benchmark": "flow-nexus-server bench", "quick": bool(args.quick), "rows_selected": selected,
              "machine": machine, "targets": TARGETS, "rows": [r.as_dict() for r in rows], "table": table}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.write(f"wrote {args.json} ({machine['wall_s']} s)\n")
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
