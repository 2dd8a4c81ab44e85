"""`flow-nexus-server demo`: the sentiment scenario end to end, through a real MCP client.

It starts this server on stdio in a throw-away state home, then: template -> 4 workers +
aggregator -> connect -> federated training on tweet-polarity with a live progress bar ->
per-worker stats -> predictions on a few sentences -> benchmark summary -> terminate, and
checks that no node process is left. The demo is a client, so it writes to the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import anyio

from flow_nexus_server.launchers.local import pid_exists

SENTENCES = [
    "I love this airline, the crew was wonderful and we landed early!",
    "Worst customer service ever. Two hours on hold and my bag is still lost.",
    "Thanks for the upgrade, what a great flight",
    "Flight cancelled again and nobody tells us anything",
]


def main(keep_home: bool = False) -> int:
    from rich.console import Console

    console = Console()
    home = tempfile.mkdtemp(prefix="flow-nexus-demo-")
    try:
        return anyio.run(run_demo, console, home)
    finally:
        from flow_nexus_server.config import Settings
        from flow_nexus_server.controller.commands import stop_everything

        stop_everything(Settings.from_env(home))  # the home's controller leaves with what it still holds
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


async def run_demo(console: Any, home: str) -> int:
    from mcp import Client, StdioServerParameters
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    env = {"FLOW_NEXUS_HOME": home, "PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "flow_nexus_server"], env=env)
    started = time.monotonic()
    console.rule("[bold]flow-nexus-server demo: federated tweet sentiment on real node processes")
    async with Client(params, read_timeout_seconds=600) as client:

        async def tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
            result = await client.call_tool(name, args)
            if result.is_error:
                raise RuntimeError(f"{name}: {result.content[0].text}")
            return result.structured_content

        console.print("[cyan]1.[/] neural_deploy_template('federated-sentiment'): init, 1 aggregator + 4 workers, connect")
        t0 = time.monotonic()
        deployed = await tool("neural_deploy_template", {"template_id": "federated-sentiment"})
        cid = deployed["cluster_id"]
        conn = deployed["connection"]
        console.print(f"   cluster {cid}: {conn['nodes_connected']} nodes in {time.monotonic() - t0:.1f} s, "
                      f"{conn['topology']} topology, {conn['connections']} links, "
                      f"mean link latency {conn['network_health']['avg_latency_ms']:.3f} ms (measured)")
        recipe = {k: v for k, v in deployed["suggested_training"].items() if k != "cluster_id"}
        console.print(f"[cyan]2.[/] neural_train_distributed({json.dumps(recipe)})")
        run = await tool("neural_train_distributed", {"cluster_id": cid, **recipe})
        workers = [nid for nid, role in run["roles"].items() if role == "worker"]
        live: dict[str, Any] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("federated rounds", total=100)
            while True:
                status = await tool("neural_cluster_status", {"cluster_id": cid})
                live = status["training"]
                m = live["metrics"]
                shown = f"round {live['epoch']}/{live['total_epochs']}"
                if "val_accuracy" in m:
                    shown += f"  val acc {m['val_accuracy']:.3f}  F1 {m.get('val_f1_macro', float('nan')):.3f}"
                bar.update(task, completed=live["progress_pct"], description=shown)
                if live["status"] != "running":
                    break
                await anyio.sleep(1)
        if live["status"] != "completed":
            console.print(f"[red]training ended {live['status']}: {live.get('error')}")
            await tool("neural_cluster_terminate", {"cluster_id": cid})
            return 1
        table = Table(title="per-worker stats (measured on each node)")
        table.add_column("node", no_wrap=True)
        for col in ("examples", "local loss", "mean step ms", "MB sent", "comm s", "RSS MB"):
            table.add_column(col, justify="right")
        for nid in workers:
            s = next((n["metrics"] for n in status["nodes"] if n["node_id"] == nid), {})
            table.add_row(nid, f"{s.get('samples_processed', 0):,.0f}", f"{s.get('local_loss', float('nan')):.3f}",
                          f"{s.get('mean_step_ms', float('nan')):.2f}", f"{s.get('bytes_sent', 0) / 2**20:.1f}",
                          f"{s.get('comm_s', 0):.2f}", f"{s.get('rss_mb', 0):.0f}")
        console.print(table)
        m = live["metrics"]
        console.print(f"   final: validation accuracy [bold]{m['val_accuracy']:.3f}[/], macro F1 {m['val_f1_macro']:.3f}, "
                      f"{live['elapsed_s']:.0f} s")

        console.print("[cyan]3.[/] neural_predict_distributed on a few sentences (ensemble of all 5 nodes)")
        pred = await tool("neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(SENTENCES),
                                                          "aggregation": "ensemble"})
        for sentence, detail in zip(SENTENCES, pred["details"]):
            console.print(f"   {detail['label']:>8}  ({detail['confidence']:.2f})  {sentence}")
        console.print(f"   answered by {pred['nodes_used']} nodes in {pred['total_latency_ms']:.1f} ms")

        console.print("[cyan]4.[/] neural_performance_benchmark (inference)")
        bench = await tool("neural_performance_benchmark", {"model_id": cid, "benchmark_type": "inference",
                                                             "input_data": json.dumps(SENTENCES[:1]), "runs": 30})
        res = bench["results"]
        console.print(f"   one sentence through {len(bench['nodes'])} nodes: p50 {res['latency_p50']:.1f} ms, "
                      f"p95 {res['latency_p95']:.1f} ms, p99 {res['latency_p99']:.1f} ms; model "
                      f"{res['parameters']:,} params ({res['model_size_mb']:.1f} MB); peak RSS per node "
                      f"{res['peak_memory_mb']:.0f} MB")

        console.print("[cyan]5.[/] neural_cluster_terminate")
        pids = [n["pid"] for n in (await tool("neural_cluster_status", {"cluster_id": cid}))["nodes"] if n["pid"]]
        term = await tool("neural_cluster_terminate", {"cluster_id": cid})
        console.print(f"   {term['message']}")
    left = [pid for pid in pids if pid_exists(pid)]
    if left:
        console.print(f"[red]processes still running: {left}")
        return 1
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f} s; no process left behind")
    return 0
