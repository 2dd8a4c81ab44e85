"""Command line: ``flow-nexus-server`` (stdio by default) and its sub-commands."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from flow_nexus_server import __version__
from flow_nexus_server.config import Settings
from flow_nexus_server.logs import setup_logging

log = logging.getLogger("flow_nexus_server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="flow-nexus-server", description="MCP server for real distributed PyTorch training")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (stderr and the log file)")
    ap.add_argument("--home", help="state home (default $FLOW_NEXUS_HOME or ~/.flow-nexus)")
    ap.add_argument("--transport", choices=["stdio"], default="stdio", help="MCP transport")
    sub = ap.add_subparsers(dest="command")
    sch = sub.add_parser("schemas", help="write or check the JSON Schema files under schemas/")
    sch.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    sch.add_argument("--out", default=None, help="directory (default: the repository's schemas/)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "schemas":
        from flow_nexus_server.schema_export import main as schemas_main

        return schemas_main(check=args.check, out=args.out)
    settings = Settings.from_env(args.home)
    setup_logging(settings.log_file, args.verbose)
    return serve_stdio(settings)


def serve_stdio(settings: Settings) -> int:
    from flow_nexus_server.server import build_server
    from flow_nexus_server.service.clusters import ClusterService

    service = ClusterService(settings)

    def on_sigterm(*_: object) -> None:
        # Unwinding the event loop would wait forever on the thread blocked reading stdin,
        # so stop the nodes right here and leave.
        log.info("SIGTERM: stopping every node this server started")
        service.close()
        logging.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        build_server(service=service).run("stdio")
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        service.close()  # idempotent; covers exits where the lifespan did not unwind
    return 0


if __name__ == "__main__":
    sys.exit(main())
