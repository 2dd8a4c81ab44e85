"""Entry point of the harness: options, the rows in order, the table on stdout, the JSON file.

``flow-nexus-server bench`` (from a source checkout) and ``python benchmarks/run.py`` both end here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks.harness import architectures, deploy, federated, lm, privacy, scaling, serving, status, sync
from benchmarks.harness.common import (
    BASELINE_PRIORITY,
    DEFAULT_JSON,
    DEFAULT_ROWS,
    ROWS,
    TARGETS,
    BenchError,
    Row,
    machine_facts,
    say,
)
from benchmarks.harness.session import Bench
from benchmarks.harness.table import render

ROW_FUNCTIONS: dict[str, Callable[[Bench], Awaitable[list[Row]]]] = {
    "deploy": deploy.row_deploy, "sync": sync.row_sync, "allreduce": sync.row_allreduce,
    "predict": serving.row_predict, "bytes": sync.row_bytes, "status": status.row_status,
    "memory": serving.row_memory, "federated": federated.row_federated, "byzantine": federated.row_byzantine,
    "privacy": privacy.row_privacy, "architectures": architectures.row_architectures,
    "lm_sync": lm.row_lm_sync, "generate": lm.row_generate,
    "scaling": scaling.row_scaling, "collectives": scaling.row_collectives,
}
# The comparisons that are most sensitive to other load run while fewest nodes exist.
RUN_ORDER = ("deploy", "sync", "scaling", "collectives", "allreduce", "federated", "byzantine", "privacy", "lm_sync",
             "predict", "generate", "bytes", "status", "memory", "architectures")


def quiet_logging(log_file: Path) -> None:
    """The server's log goes to its file; only warnings reach stderr (the table goes to stdout)."""
    import logging

    from flow_nexus_server.logs import setup_logging

    setup_logging(log_file)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr:
            h.setLevel(logging.WARNING)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options."""
    ap.add_argument("--quick", action="store_true", help="reduced version for CI smoke runs (< 3 minutes)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                    help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument("--only", nargs="+", choices=ROWS, metavar="ROW",
                    help=f"run only these rows: {', '.join(ROWS)} (default: all but architectures)")
    ap.add_argument("--arch-datasets", nargs="+", choices=architectures.DATASETS, metavar="DATASET",
                    help="architectures row: only these datasets (default: all; --quick: digits)")
    ap.add_argument("--arch-architectures", nargs="+", choices=architectures.ARCHITECTURES, metavar="ARCH",
                    help="architectures row: only these architectures (default: all)")
    ap.add_argument("--flower-python", metavar="PATH",
                    help="python of a side venv with flwr[simulation]==1.41.0 and torch, for the federated baseline")
    ap.add_argument("--home",
                    help="state home for the benchmark's server (default: a temporary directory, removed after)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(
        prog="flow-nexus-server bench", description="Benchmark the real server against plain baselines, side by side.")
    ).parse_args(argv)


async def run_rows(args: argparse.Namespace, home: Path, selected: list[str]) -> list[Row]:
    from mcp import Client

    from flow_nexus_server.config import Settings
    from flow_nexus_server.server import build_server
    from flow_nexus_server.service.clusters import ClusterService

    rows: list[Row] = []
    # Never a configured FLOW_NEXUS_DB_URL: benchmark clusters stay out of a real database.
    settings = Settings.from_env(home).model_copy(update={"db_url": f"sqlite:///{home / 'state.db'}"})
    BASELINE_PRIORITY["nice"] = settings.node_nice
    service = ClusterService(settings)  # the collectives row asks the nodes for more than the tool's defaults
    server = build_server(settings, service)
    quiet_logging(settings.log_file)
    async with Client(server, read_timeout_seconds=900) as client:
        bench = Bench(client, args, home, service)
        for name in RUN_ORDER:
            if name not in selected:
                continue
            t0 = time.perf_counter()
            try:
                got = await ROW_FUNCTIONS[name](bench)
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

    selected = list(dict.fromkeys(args.only or DEFAULT_ROWS))
    machine = machine_facts()
    given_home = args.home
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

