"""Row ``deploy``: 4 nodes to healthy, warm launcher (ours, the server's default) vs one cold
``python -m workers.agent`` per node. ``benchmarks/deploy_bench.py`` calls the same functions."""

from __future__ import annotations

import secrets
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness.common import TARGETS, BenchError, Row, ratio, say
from benchmarks.harness.session import Bench


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


async def row_deploy(bench: Bench) -> list[Row]:
    import anyio

    reps = 1 if bench.quick else 3
    say(f"deploy: 4 nodes cold vs warm, {reps} repetition(s)")
    res = await anyio.to_thread.run_sync(lambda: deploy_compare(4, reps))
    warm, cold = res["warm"]["median_s"], res["cold"]["median_s"]
    return [Row("deploy", "deploy 4 nodes to healthy (median wall)", "s", warm, cold, ratio(warm, cold),
                f"warm <= {TARGETS['deploy_warm_s']:.1f} s", warm <= TARGETS["deploy_warm_s"],
                f"ours: warm fork (default launcher); theirs: cold process per node; "
                f"template start once {res['warm_template_start_s']:.2f} s", details=res)]
