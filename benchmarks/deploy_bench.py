"""Deploy N nodes cold (one ``python -m workers.agent`` per node) vs warm (forked by the spawner).

Each repetition launches N nodes concurrently, as the service's ``deploy_nodes`` does (one
thread per node: launch, then the /health check), and times the wall clock until every node
has answered /health with its own node id. The nodes are stopped between repetitions
(untimed). For warm, the template is started once beforehand (its start-up time is reported
separately). One untimed cold start first fills the page cache, so cold runs are not
penalised by a cold disk.

    python benchmarks/deploy_bench.py [--nodes 4] [--reps 3] [--out benchmarks/results/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flow_nexus_server.launchers import NodeHandle, NodeSpec, SubprocessLauncher  # noqa: E402
from flow_nexus_server.launchers.warm import WarmSubprocessLauncher  # noqa: E402

TARGET_WARM_S = 1.0


def start_node(launcher: Any, spec: NodeSpec) -> tuple[NodeHandle, float, float]:
    """What the service's ``_start_node`` does: launch, then check /health answers as this node.
    Returns the handle, the launch time and the launch + health time."""
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
    token = secrets.token_hex(32)
    specs = [NodeSpec(f"node_{secrets.token_hex(4)}", f"dnc_{tag}", "worker",
                      root / tag / f"n{i}", token) for i in range(nodes)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, nodes)) as pool:
        results = list(pool.map(lambda s: start_node(launcher, s), specs))
    wall = time.perf_counter() - t0
    handles = [h for h, _, _ in results]
    warm_refs = sum(":" in h.ref for h in handles)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    try:
        cold = SubprocessLauncher()
        deploy(cold, root, 1, "prime")  # untimed: fills the page cache

        cold_runs = [deploy(cold, root, args.nodes, f"cold{i}") for i in range(args.reps)]

        warm = WarmSubprocessLauncher(root / "home")
        t0 = time.perf_counter()
        if not warm.start():
            raise SystemExit(f"the warm spawner did not start; see {root / 'home' / 'spawner.log'}")
        template_s = time.perf_counter() - t0
        try:
            warm_runs = [deploy(warm, root, args.nodes, f"warm{i}") for i in range(args.reps)]
        finally:
            warm.close()
        if any(r["forked_nodes"] != args.nodes for r in warm_runs):
            raise SystemExit("some warm launches fell back to a cold start; see the log")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    c, w = summary(cold_runs), summary(warm_runs)
    ratio = c["median_s"] / w["median_s"]
    import torch

    result = {
        "benchmark": "deploy",
        "nodes": args.nodes,
        "repetitions": args.reps,
        "measured": "wall clock from the first launch until every node answered /health, "
                    "launches concurrent (one thread per node)",
        "cold": c,
        "warm": w,
        "warm_template_start_s": template_s,
        "speedup_median": ratio,
        "target_warm_s": TARGET_WARM_S,
        "warm_meets_target": w["median_s"] <= TARGET_WARM_S,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                 "platform": platform.platform()},
        "time": time.time(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def fmt(xs: list[float]) -> str:
        return " ".join(f"{x:6.3f}" for x in xs)

    print(f"deploying {args.nodes} nodes concurrently, {args.reps} repetitions ({os.cpu_count()} CPUs)")
    print(f"{'mode':<6} {'runs (s)':<{7 * args.reps}} {'median':>8} {'per node':>9} {'launch':>8}")
    for name, s in (("cold", c), ("warm", w)):
        print(f"{name:<6} {fmt(s['runs_s']):<{7 * args.reps}} {s['median_s']:8.3f} "
              f"{s['per_node_median_s']:9.3f} {s['per_node_launch_median_s']:8.3f}")
    print("(median wall for all nodes healthy; per node: launch + /health; launch: until agent.json)")
    print(f"cold/warm median ratio: {ratio:.1f}x; warm template start (once): {template_s:.2f} s; "
          f"target warm <= {TARGET_WARM_S:.1f} s: {'met' if result['warm_meets_target'] else 'MISSED'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
