"""What the dashboard's feed costs while 16 nodes train: CPU time of the serving processes.

Starts ``flow-nexus-server dashboard`` on a throw-away home, a cluster of 16 workers training
(federated, digits) through a stdio front-end, then alternates windows without and with one
page's feed open (logged in with the printed link, reading /dashboard/feed). The figure is the
extra CPU time of the dashboard front-end plus the controller (psutil, user + system) per
second of wall time, as a share of one core. Run: ``python benchmarks/dashboard_feed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rpc_call(proc: subprocess.Popen, state: dict, method: str, params: dict) -> dict:
    state["id"] += 1
    proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": state["id"], "method": method, "params": params}) + "\n")
    proc.stdin.flush()
    while True:
        reply = json.loads(proc.stdout.readline())
        if reply.get("id") == state["id"]:
            return reply["result"]


def tool(proc: subprocess.Popen, state: dict, name: str, args: dict) -> dict:
    result = rpc_call(proc, state, "tools/call", {"name": name, "arguments": args})
    assert not result.get("isError"), result
    return result["structuredContent"]


def cpu_seconds(procs: list[psutil.Process]) -> list[float]:
    return [p.cpu_times().user + p.cpu_times().system for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--window-s", type=float, default=15.0)
    ap.add_argument("--pairs", type=int, default=2, help="(without, with) window pairs")
    args = ap.parse_args(argv)
    script = str(Path(sys.executable).with_name("flow-nexus-server"))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FLOW_NEXUS_HOME": str(home), "OMP_NUM_THREADS": "1"}
        port = free_port()
        out = open(Path(tmp) / "dashboard.out", "w+")  # noqa: SIM115
        dash = subprocess.Popen([script, "--port", str(port), "dashboard"], env=env, stdout=out,
                                stderr=subprocess.DEVNULL)
        front = subprocess.Popen([script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.DEVNULL)
        state = {"id": 0}
        try:
            rpc_call(front, state, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                                  "clientInfo": {"name": "bench", "version": "1"}})
            front.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
            front.stdin.flush()
            cid = tool(front, state, "neural_cluster_init", {"name": "feed", "max_nodes": args.nodes})["cluster_id"]
            tool(front, state, "neural_node_deploy", {"cluster_id": cid, "count": args.nodes})
            tool(front, state, "neural_cluster_connect", {"cluster_id": cid})
            tool(front, state, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 1000,
                                                            "federated": True, "batch_size": 32})
            link = None
            while link is None:
                out.seek(0)
                found = re.search(r"log in \(one use[^)]*\): (\S+)", out.read())
                link = found and found[1]
                time.sleep(0.2)
            controller = psutil.Process(int((home / "controller.lock").read_text().strip()))
            procs = [psutil.Process(dash.pid), controller]
            http = httpx.Client(timeout=httpx.Timeout(30, read=None))
            login = http.get(link, follow_redirects=False)
            assert login.status_code == 303, login.status_code
            time.sleep(5)  # training under way

            def window(with_feed: bool) -> tuple[list[float], int]:
                stop = threading.Event()
                received = [0]

                def read() -> None:
                    with http.stream("GET", f"http://127.0.0.1:{port}/dashboard/feed") as feed:
                        for chunk in feed.iter_bytes():
                            received[0] += len(chunk)
                            if stop.is_set():
                                return

                reader = threading.Thread(target=read, daemon=True) if with_feed else None
                if reader:
                    reader.start()
                    time.sleep(1.0)  # the snapshot is not part of the steady state
                t0, c0 = time.monotonic(), cpu_seconds(procs)
                time.sleep(args.window_s)
                share = [(c1 - c) / (time.monotonic() - t0) for c, c1 in zip(c0, cpu_seconds(procs))]
                stop.set()
                if reader:
                    reader.join(timeout=5)
                return share, received[0]

            rows = []
            for _ in range(args.pairs):
                rows.append((window(False), window(True)))
            def mean(values: list[float]) -> float:
                return sum(values) / len(values)

            without = mean([sum(r[0][0]) for r in rows])
            with_feed = mean([sum(r[1][0]) for r in rows])
            front_with = mean([r[1][0][0] for r in rows])  # the dashboard front-end serves nothing but the feed
            front_without = mean([r[0][0][0] for r in rows])
            rate = mean([r[1][1] for r in rows]) / args.window_s
            rounds = tool(front, state, "neural_cluster_status", {"cluster_id": cid}).get("current_epoch")
            print(f"{args.nodes} nodes training (round {rounds} reached); share of one core: front-end + controller "
                  f"without feed {100 * without:.1f}%, with one page's feed {100 * with_feed:.1f}% (difference "
                  f"{100 * (with_feed - without):.1f}%); the front-end alone {100 * front_without:.2f}% -> "
                  f"{100 * front_with:.2f}%; feed {rate / 1024:.1f} KiB/s")
            print(json.dumps({"nodes": args.nodes, "cpu_without_feed": without, "cpu_with_feed": with_feed,
                              "feed_cost": with_feed - without, "frontend_without": front_without,
                              "frontend_with": front_with, "feed_bytes_per_s": rate, "rounds": rounds,
                              "windows": [[sum(a[0]), sum(b[0])] for a, b in rows]}))
            tool(front, state, "neural_cluster_terminate", {"cluster_id": cid})
        finally:
            front.stdin.close()
            front.wait(timeout=60)
            subprocess.run([script, "stop", "--all"], env=env, capture_output=True, timeout=120)
            dash.terminate()
            dash.wait(timeout=30)
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
