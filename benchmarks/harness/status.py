"""Row ``status``: ``neural_cluster_status`` latency on a 4-node cluster while it trains, with the
in-memory client and with the SDK stdio client."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from benchmarks.harness.common import ROOT, SYNC_ARCH, SYNC_JOB, SYNC_PRESET, TARGETS, BenchError, Row, pct, say
from benchmarks.harness.session import Bench


async def status_while_training(bench: Bench, client: Any, cid: str, calls: int) -> dict[str, Any]:
    import anyio

    from flow_nexus_server.states import SessionState

    run = await bench.tool("neural_train_distributed", {"cluster_id": cid, **SYNC_JOB, "epochs": 200,
                                                        "checkpoint_every": 0}, client)
    sid = run["session_id"]
    try:
        deadline = time.monotonic() + 120
        while True:
            st = await bench.tool("neural_training_status", {"session_id": sid}, client)
            live = st.get("live") or {}
            if st["status"] != SessionState.RUNNING:
                raise BenchError(f"session {sid} ended {st['status']} before the status calls: {st.get('error')}")
            if live.get("status") == SessionState.RUNNING and live.get("step", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"session {sid} did not start stepping within 120 s")
            await anyio.sleep(0.2)
        times, steps = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            reply = await bench.tool("neural_cluster_status", {"cluster_id": cid}, client)
            times.append((time.perf_counter() - t0) * 1000)
            steps.append((reply.get("training") or {}).get("step"))
            await anyio.sleep(0.05)
        st = await bench.tool("neural_training_status", {"session_id": sid}, client)
        if st["status"] != SessionState.RUNNING:
            raise BenchError(f"session {sid} stopped ({st['status']}) during the status calls")
    finally:
        try:
            await bench.tool("neural_training_stop", {"session_id": sid}, client)
        except BenchError as exc:
            say(f"status: stopping {sid}: {exc}")
    return {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "calls": calls, "times_ms": times,
            "training_steps_seen": [steps[0], steps[-1]], "session_id": sid}


async def row_status(bench: Bench) -> list[Row]:
    calls = 40 if bench.quick else 200
    cid = await bench.cluster(4)
    say(f"status: {calls} neural_cluster_status calls on 4 nodes while they train (in-memory)")
    mem = await status_while_training(bench, bench.client, cid, calls)
    p50, p95 = TARGETS["status_p50_ms"], TARGETS["status_p95_ms"]
    rows = [Row("status.memory", "cluster status, 4 nodes training, in-memory client, p50", "ms", mem["p50_ms"],
                target=f"p50 <= {p50:.0f} ms, p95 <= {p95:.0f} ms",
                met=mem["p50_ms"] <= p50 and mem["p95_ms"] <= p95,
                note=f"p95 {mem['p95_ms']:.1f} ms; {calls} calls, training steps "
                     f"{mem['training_steps_seen'][0]}->{mem['training_steps_seen'][1]}", details=mem)]
    try:
        say("status: the same over stdio (a second server process, its own 4 nodes)")
        std = await status_over_stdio(bench, calls)
        rows.append(Row("status.stdio", "cluster status, 4 nodes training, stdio client, p50", "ms",
                        std["p50_ms"], target=f"p50 <= {TARGETS['status_stdio_p50_ms']:.0f} ms",
                        met=std["p50_ms"] <= TARGETS["status_stdio_p50_ms"],
                        note=f"p95 {std['p95_ms']:.1f} ms; {calls} calls, SDK stdio client, server subprocess",
                        details=std))
    except Exception as exc:  # noqa: BLE001 - the row says why it has no figure
        rows.append(Row("status.stdio", "cluster status over stdio", status="failed",
                        reason=f"{type(exc).__name__}: {exc}"))
    return rows


async def status_over_stdio(bench: Bench, calls: int) -> dict[str, Any]:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    home = bench.home / "stdio-home"
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
                cid = (await bench.tool("neural_cluster_init", {"name": "bench-stdio", "architecture": SYNC_ARCH},
                                        client))["cluster_id"]
                await bench.tool("neural_node_deploy", {"cluster_id": cid, "count": 4, "model": SYNC_PRESET},
                                 client)
                await bench.tool("neural_cluster_connect", {"cluster_id": cid}, client)
                try:
                    return await status_while_training(bench, client, cid, calls)
                finally:
                    await bench.tool("neural_cluster_terminate", {"cluster_id": cid}, client)
    finally:  # the stdio server is a front-end: its home's controller leaves with what it still holds
        await anyio.to_thread.run_sync(stop_everything, Settings.from_env(home))
