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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The measuring code is shared with `flow-nexus-server bench` (row "deploy").
from benchmarks.harness.common import BenchError  # noqa: E402
from benchmarks.harness.deploy import deploy_compare  # noqa: E402

TARGET_WARM_S = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = ap.parse_args()

    try:
        res = deploy_compare(args.nodes, args.reps)
    except BenchError as exc:
        raise SystemExit(str(exc)) from exc
    c, w = res["cold"], res["warm"]
    ratio = res["speedup_median"]
    template_s = res["warm_template_start_s"]
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
