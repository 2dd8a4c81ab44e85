"""The same flow as http_client.py over stdio, with the official MCP Python SDK client.

The client spawns `flow-nexus-server` (stdio transport) as a child process:

    python examples/stdio_client.py                       # state in $FLOW_NEXUS_HOME or ~/.flow-nexus
    python examples/stdio_client.py --home /tmp/fn-demo

It lists the tools, creates a cluster with neural_cluster_init (asking for progress),
lists the clusters, and prints the results. The server, and any node it started, stops
when the client closes its stdin.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters


def server_command() -> str:
    """`flow-nexus-server` beside this interpreter (a virtualenv), else the one on PATH."""
    beside = Path(sys.executable).with_name("flow-nexus-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("flow-nexus-server")
    if not found:
        raise SystemExit("flow-nexus-server is not installed: pip install -e . first")
    return found


async def call(client: Client, tool: str, arguments: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments, **kwargs)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text}")
    return result.structured_content or {}


async def run(args: argparse.Namespace) -> None:
    # The SDK passes the child only a few safe variables (HOME, PATH, ...): hand over ours explicitly.
    env = {k: v for k, v in os.environ.items() if k.startswith("FLOW_NEXUS_") or k in ("OMP_NUM_THREADS",)}
    cmd = [args.command] if args.command else [server_command()]
    if args.home:
        cmd += ["--home", args.home]
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=env)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"  progress {progress:g}{f'/{total:g}' if total is not None else ''} {message or ''}".rstrip())

    async with Client(params, read_timeout_seconds=120) as client:
        print(f"connected over stdio, protocol {client.protocol_version}")
        tools = (await client.list_tools()).tools
        print(f"tools ({len(tools)}): {', '.join(t.name for t in tools)}")

        created = await call(client, "neural_cluster_init", {"name": args.name, "topology": "ring"},
                             progress_callback=on_progress)
        print(f"created cluster {created['cluster_id']} ({created['name']}, {created['topology']}, "
              f"status {created['status']})")

        listed = await call(client, "neural_cluster_list", {})
        print(f"clusters ({listed['count']}):")
        for c in listed["clusters"]:
            print(f"  {c['cluster_id']} {c['name']} {c['status']} topology={c['topology']} nodes={c['nodes']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="state home for the spawned server (default $FLOW_NEXUS_HOME)")
    ap.add_argument("--command", help="server executable (default: flow-nexus-server)")
    ap.add_argument("--name", default="stdio-example", help="name of the cluster to create")
    args = ap.parse_args(argv)
    try:
        anyio.run(run, args)
    except Exception as exc:  # noqa: BLE001 - an example: say what went wrong, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
