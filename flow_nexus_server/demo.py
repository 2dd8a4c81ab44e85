"""`flow-nexus-server demo`: the sentiment scenario end to end, through a real MCP client.

It starts this server on stdio in the state home (``--home``, else ``$FLOW_NEXUS_HOME``, else a
throw-away one), then: template -> 4 workers + aggregator -> connect -> federated training on
tweet-polarity with a live progress bar -> per-worker stats -> predictions on a few sentences ->
benchmark summary -> terminate, and checks that no node process is left. The demo is a client,
so it writes to the terminal; the server's log goes to the home's log file, never over the bar.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from flow_nexus_server.config import Settings
from flow_nexus_server.launchers.local import pid_exists
from flow_nexus_server.states import SessionState

SENTENCES = [
    "I love this airline, the crew was wonderful and we landed early!",
    "Worst customer service ever. Two hours on hold and my bag is still lost.",
    "Thanks for the upgrade, what a great flight",
    "Flight cancelled again and nobody tells us anything",
]
FRONTEND_STDERR = "demo-frontend.stderr"  # the stdio server's stderr: its log lines, kept off the terminal

Tool = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def main(home: str | None = None, keep_home: bool = False) -> int:
    """Run the demo in ``home`` (else ``$FLOW_NEXUS_HOME``). Without either it uses a throw-away
    home, stops everything there afterwards and removes it unless ``keep_home``."""
    from rich.console import Console

    settings = Settings.from_env(home)
    given = "home" in settings.model_fields_set  # --home or FLOW_NEXUS_HOME, not the default home
    state_home = settings.home if given else Path(tempfile.mkdtemp(prefix="flow-nexus-demo-"))
    try:
        return anyio.run(run_demo, Console(), Settings.from_env(state_home))
    finally:
        if not given:  # a home the user named keeps its controller and whatever else it runs
            from flow_nexus_server.controller.commands import stop_everything

            stop_everything(Settings.from_env(state_home))  # the home's controller leaves with what it still holds
            if not keep_home:
                shutil.rmtree(state_home, ignore_errors=True)


async def run_demo(console: Any, settings: Settings) -> int:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from flow_nexus_server.home import open_private, prepare_home

    env = {"FLOW_NEXUS_HOME": str(settings.home), "PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "flow_nexus_server"], env=env)
    started = time.monotonic()
    console.rule("[bold]flow-nexus-server demo: federated tweet sentiment on real node processes")
    console.print(f"   state home {settings.home}; the server logs to {settings.log_file}")
    prepare_home(settings)
    with open(settings.home / FRONTEND_STDERR, "a", encoding="utf-8", opener=open_private) as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=600) as client:

            async def tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
                result = await client.call_tool(name, args)
                if result.is_error:
                    raise RuntimeError(f"{name}: {result.content[0].text}")
                return result.structured_content

            pids = await scenario(console, tool)
    if pids is None:
        console.print(f"[red]see the server's log: {settings.log_file}")
        return 1
    left = [pid for pid in pids if pid_exists(pid)]
    if left:
        console.print(f"[red]processes still running: {left}")
        return 1
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f} s; no process left behind")
    return 0


async def scenario(console: Any, tool: Tool) -> list[int] | None:
    """Deploy, train, show, predict, benchmark, terminate. Returns the node pids (to check they
    are gone), or None when training did not complete. The cluster is terminated either way."""
    console.print("[cyan]1.[/] neural_deploy_template('federated-sentiment'): init, 1 aggregator + 4 workers, connect")
    t0 = time.monotonic()
    deployed = await tool("neural_deploy_template", {"template_id": "federated-sentiment"})
    cid = deployed["cluster_id"]
    conn = deployed["connection"]
    console.print(f"   cluster {cid}: {conn['nodes_connected']} nodes in {time.monotonic() - t0:.1f} s, "
                  f"{conn['topology']} topology, {conn['connections']} links, "
                  f"mean link latency {conn['network_health']['avg_latency_ms']:.3f} ms (measured)")
    terminated = False
    try:
        recipe = {k: v for k, v in deployed["suggested_training"].items() if k != "cluster_id"}
        console.print(f"[cyan]2.[/] neural_train_distributed({json.dumps(recipe)})")
        run = await tool("neural_train_distributed", {"cluster_id": cid, **recipe})
        workers = [nid for nid, role in run["roles"].items() if role == "worker"]
        live = await follow_training(console, tool, cid, workers)
        if live["status"] != SessionState.COMPLETED:
            console.print(f"[red]training ended {live['status']}: {live.get('error')}")
            return None
        show_results(console, live, workers)
        await predict_and_benchmark(console, tool, cid)
        console.print("[cyan]5.[/] neural_cluster_terminate")
        pids = [n["pid"] for n in (await tool("neural_cluster_status", {"cluster_id": cid}))["nodes"] if n["pid"]]
        term = await tool("neural_cluster_terminate", {"cluster_id": cid})
        terminated = True
        console.print(f"   {term['message']}")
        return pids
    finally:
        if not terminated:
            await tool("neural_cluster_terminate", {"cluster_id": cid})


def progress_pct(live: dict[str, Any], workers: list[str]) -> float:
    """Rounds done plus the workers' mean share of the round in progress: the session's own step
    counts whole rounds, which would leave the bar at 0% for the whole first round."""
    total = live["total_steps"]
    if not total:
        return 0.0
    within = 0.0
    if live["epoch"] > live["step"]:  # a round is in progress
        stats = [live["nodes"].get(nid, {}) for nid in workers]
        shares = [min(1.0, s.get("round_steps_done", 0) / s["round_steps"]) for s in stats if s.get("round_steps")]
        within = statistics.fmean(shares) if shares else 0.0
    return 100.0 * min(1.0, (live["step"] + within) / total)


async def follow_training(console: Any, tool: Tool, cid: str, workers: list[str]) -> dict[str, Any]:
    """A progress bar until the session ends; returns its last live view."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("round {task.fields[round]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("steps this round, all workers {task.fields[steps]}"), TextColumn("{task.fields[scores]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("federated training", total=100, round="-", steps="-", scores="")
        shown = 0.0  # never backwards: a worker's stats may still show the last round for a push or two
        while True:
            status = await tool("neural_cluster_status", {"cluster_id": cid})
            # Cluster status carries each node's training stats in its row (nodes[].metrics).
            live = {**status["training"], "nodes": {n["node_id"]: n["metrics"] for n in status["nodes"]}}
            m = live["metrics"]
            stats = [s for s in (live["nodes"].get(nid, {}) for nid in workers) if s.get("round_steps")]
            steps = (f"{sum(int(s.get('round_steps_done', 0)) for s in stats)}/"
                     f"{sum(int(s['round_steps']) for s in stats)}") if stats else "-"
            scores = (f"val acc {m['val_accuracy']:.3f}  macro F1 {m.get('val_f1_macro', float('nan')):.3f}"
                      if "val_accuracy" in m else "")
            shown = max(shown, progress_pct(live, workers))
            bar.update(task, completed=shown, round=f"{live['epoch']}/{live['total_epochs']}",
                       steps=steps, scores=scores)
            if live["status"] != SessionState.RUNNING:
                return live
            await anyio.sleep(1)


def show_results(console: Any, live: dict[str, Any], workers: list[str]) -> None:
    from rich.table import Table

    table = Table(title="per-worker stats (measured on each node)")
    table.add_column("node", no_wrap=True)
    for col in ("samples processed", "last local loss", "mean step (ms)", "sent (MiB)", "comm time (s)", "RSS (MiB)"):
        table.add_column(col, justify="right")
    for nid in workers:
        s = live["nodes"].get(nid, {})
        table.add_row(nid, f"{s.get('samples_processed', 0):,.0f}", f"{s.get('local_loss', float('nan')):.3f}",
                      f"{s.get('mean_step_ms', float('nan')):.2f}", f"{s.get('bytes_sent', 0) / 2**20:.1f}",
                      f"{s.get('comm_s', 0):.2f}", f"{s.get('rss_mb', 0):.0f}")
    console.print(table)
    m = live["metrics"]
    console.print(f"   final: validation accuracy [bold]{m['val_accuracy']:.3f}[/], macro F1 {m['val_f1_macro']:.3f}, "
                  f"{live['elapsed_s']:.0f} s")


async def predict_and_benchmark(console: Any, tool: Tool, cid: str) -> None:
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
