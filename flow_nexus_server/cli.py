"""Command line: ``flow-nexus-server`` (stdio by default) and its sub-commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flow_nexus_server import __version__
from flow_nexus_server.config import Settings, settings_lines, settings_markdown
from flow_nexus_server.dashboard_access import LOGIN_CODE_TTL_S
from flow_nexus_server.home import HTTP_TOKEN_FILE, PRIVATE_UMASK
from flow_nexus_server.logs import DropQueryStrings, setup_logging

log = logging.getLogger("flow_nexus_server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="flow-nexus-server",
                                 description="MCP server for real distributed PyTorch training")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (stderr and the log file)")
    ap.add_argument("--home", help="state home (default $FLOW_NEXUS_HOME or ~/.flow-nexus)")
    ap.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                    help="MCP transport: stdio (default, what MCP hosts spawn) or http (streamable HTTP at /mcp)")
    http = ap.add_argument_group("http transport")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); "
                      "anything but loopback needs a token")
    http.add_argument("--port", type=int, default=8765, help="port to bind (default 8765)")
    http.add_argument("--token-file", metavar="PATH", help="file holding the bearer token "
                      "(default: $FLOW_NEXUS_TOKEN, else one generated into <home>/http-token); clients send "
                      "'Authorization: Bearer <token>'")
    http.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                      help="extra Host header value to accept (DNS-rebinding protection); repeatable")
    sub = ap.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the federated sentiment scenario end to end (a few minutes), in --home "
                          "or $FLOW_NEXUS_HOME, else in a throw-away home")
    demo.add_argument("--keep-home", action="store_true", help="keep the demo's throw-away state home afterwards "
                      "(used when neither --home nor FLOW_NEXUS_HOME is given; a home you name is always kept)")
    sch = sub.add_parser("schemas", help="write or check the JSON Schema files under schemas/")
    sch.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    sch.add_argument("--out", default=None, help="directory (default: the repository's schemas/)")
    # The benchmark harness lives in the source checkout's benchmarks/ and owns its options:
    # everything after "bench" (--help included) goes to it.
    sub.add_parser("bench", add_help=False, help="benchmark the real server against plain baselines (one "
                   "table; from a source checkout; 'bench --help' lists its options)")
    conv = sub.add_parser(
        "convert-checkpoint", help="convert an old pickle checkpoint (.pt) you trust to .safetensors",
        description="Convert an old checkpoint of this server (ckpt-*.pt, a pickle) to the safetensors format "
                    "nodes read. Unpickling can run arbitrary code: run this only on a file you trust, on your "
                    "own machine. Nodes never unpickle.")
    conv.add_argument("old", help="the old .pt checkpoint")
    conv.add_argument("new", nargs="?", help="the .safetensors file to write (default: OLD with that suffix)")
    st = sub.add_parser("status", help="the home's controller, its clusters, nodes and running sessions")
    st.add_argument("--json", action="store_true", help="print JSON (controller_pid, clusters, sessions)")
    stop = sub.add_parser("stop", help="stop one cluster, or every cluster and the controller")
    which = stop.add_mutually_exclusive_group(required=True)
    which.add_argument("cluster_id", nargs="?", help="the cluster to stop (its nodes are stopped and verified gone)")
    which.add_argument("--all", action="store_true", help="stop every cluster of this home, then the controller")
    sets = sub.add_parser("settings", help="the FLOW_NEXUS_* settings in effect")
    sets.add_argument("--markdown", action="store_true", help="print instead the table of every setting "
                      "(docs/settings.md)")
    dash = sub.add_parser("dashboard", help="serve the HTTP front-end with its dashboard page (on loopback unless "
                          "--host says otherwise) and print its address and a one-time login link",
                          description="Serve the HTTP front-end (MCP at /mcp, the dashboard at /dashboard) and print "
                          "the dashboard's address and a one-time login link (one use, valid "
                          f"{LOGIN_CODE_TTL_S:.0f} s). The link sets a cookie session and leads to the bare page: "
                          "the bearer token never reaches the browser. Binding beyond loopback needs a token, as "
                          "for --transport http.")
    for flag, kwargs in (("--host", {"help": "address to bind (default 127.0.0.1)"}),
                         ("--port", {"type": int, "help": "port to bind (default 8765)"}),
                         ("--token-file", {"metavar": "PATH", "help": "file holding the bearer token"}),
                         ("--allowed-host", {"action": "append", "metavar": "HOST[:PORT]",
                                             "help": "extra Host header value to accept; repeatable"})):
        dash.add_argument(flag, default=argparse.SUPPRESS, **kwargs)  # the same options as before the command
    dash.add_argument("--new-link", action="store_true", help="print a new one-time login link from the dashboard "
                      "already serving on --host/--port (it asks with the bearer token) and exit")
    sub.add_parser("controller", help="run the home's controller in the foreground (front-ends start it by "
                   "themselves; it owns the clusters, nodes and sessions)")
    args, rest = ap.parse_known_args(argv)
    if rest and args.command != "bench":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_args = rest
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "demo":
        from flow_nexus_server.demo import main as demo_main

        return demo_main(home=args.home, keep_home=args.keep_home)
    if args.command == "schemas":
        from flow_nexus_server.schema_export import main as schemas_main

        return schemas_main(check=args.check, out=args.out)
    if args.command == "bench":
        return run_bench(args.home, args.bench_args)
    if args.command == "convert-checkpoint":
        return convert_checkpoint(args.old, args.new)
    settings = Settings.from_env(args.home)
    if args.command == "settings":
        sys.stdout.write(settings_markdown() if args.markdown else "\n".join(settings_lines(settings)) + "\n")
        return 0
    token: str | None = None
    if args.transport == "http" or args.command == "dashboard":
        token, problem = http_token(args, settings)
        if problem:
            sys.stderr.write(f"flow-nexus-server: {problem}\n")
            return 2
    os.umask(PRIVATE_UMASK)  # everything the server and its nodes create is private (see home.py)
    if args.command in ("status", "stop"):
        from flow_nexus_server.controller.commands import status_command, stop_command

        return status_command(settings, as_json=args.json) if args.command == "status" else \
            stop_command(settings, cluster_id=args.cluster_id, stop_all=args.all)
    if args.command == "dashboard" and args.new_link:
        return print_new_login_link(settings, host=args.host, port=args.port, token=token)
    setup_logging(settings.log_file, args.verbose)
    if args.command == "controller":
        from flow_nexus_server.controller.daemon import run as run_controller

        return run_controller(settings)
    if args.transport == "http" or args.command == "dashboard":
        if token is None:
            token = generated_http_token(settings)
        return serve_http(settings, host=args.host, port=args.port, token=token, allowed_hosts=args.allowed_host,
                          show_dashboard=args.command == "dashboard")
    return serve_stdio(settings)


def run_bench(home: str | None, bench_args: list[str]) -> int:
    """``bench``: runs the harness of the source checkout this package is installed from (editable
    install); an installed wheel has no benchmarks/ and says where to run it instead."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "harness" / "main.py").is_file():
        sys.stderr.write("flow-nexus-server: bench runs from a source checkout, which this installed package is "
                         "not: clone the flow-nexus-server repository, run 'pip install -e .' in it and run "
                         "'flow-nexus-server bench' (or 'python benchmarks/run.py') there.\n")
        return 2
    sys.path.insert(0, str(checkout))
    from benchmarks.harness.main import main as bench_main

    return bench_main([*(["--home", home] if home else []), *bench_args])


def convert_checkpoint(old: str, new: str | None) -> int:
    """``convert-checkpoint``: the one place a pickle is loaded, on the user's own trusted file."""
    from workers.training.checkpoint import convert_legacy
    from workers.training.common import TrainingError

    try:
        written = convert_legacy(old, new)
    except TrainingError as exc:
        sys.stderr.write(f"flow-nexus-server: {exc}\n")
        return 1
    print(f"wrote {written}")
    return 0


def http_token(args: argparse.Namespace, settings: Settings) -> tuple[str | None, str | None]:
    """(token, None), or (None, why the HTTP server must not start)."""
    from flow_nexus_server.http_app import is_loopback

    if not 0 < args.port < 65536:
        return None, f"--port must be between 1 and 65535, got {args.port}"
    token: str | None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"cannot read the token file {args.token_file}: {exc}"
        if not token:
            return None, f"the token file {args.token_file} is empty"
    else:
        token = (settings.token.get_secret_value().strip() if settings.token else "") or None
    if token is None and not is_loopback(args.host):
        return None, (
            f"refusing to bind {args.host} (not a loopback address) without a token: anyone who can reach "
            "the port could start processes on this machine. Set FLOW_NEXUS_TOKEN or pass --token-file PATH, "
            "or bind to 127.0.0.1."
        )
    return token, None


def generated_http_token(settings: Settings) -> str:
    """The token of an HTTP server started without one: loopback is shared by every local account,
    so the endpoint is never open. Kept in ``<home>/http-token`` (0600, reused across restarts)."""
    from flow_nexus_server.home import prepare_home, read_or_create_secret

    prepare_home(settings)
    path = settings.home / HTTP_TOKEN_FILE
    token = read_or_create_secret(path)
    log.info("no token given: clients authenticate with the token in %s (readable by you only)", path)
    return token


def serve_stdio(settings: Settings) -> int:
    """A front-end: relay MCP between the host (stdin/stdout) and the home's controller."""
    from flow_nexus_server.controller.channel import ControllerUnavailable, ensure_controller, relay_stdio

    try:
        paths = ensure_controller(settings)
    except ControllerUnavailable as exc:
        log.error("%s", exc)
        return 1
    return relay_stdio(paths)


def dashboard_url(host: str, port: int, path: str) -> str:
    """The URL a browser on this machine opens (a wildcard bind is reached on loopback)."""
    from flow_nexus_server.http_app import host_port

    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host.strip("[]"), host)
    return f"http://{host_port(shown, port)}{path}"


def print_new_login_link(settings: Settings, *, host: str, port: int, token: str | None) -> int:
    """``dashboard --new-link``: a fresh one-time link from the front-end already serving there."""
    import httpx

    from flow_nexus_server.dashboard_access import LOGIN_CODES_PATH

    if token is None:
        path = settings.home / HTTP_TOKEN_FILE
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError:
            sys.stderr.write(f"flow-nexus-server: no token given and none in {path}: is a dashboard serving this "
                             "home? Start one with 'flow-nexus-server dashboard'.\n")
            return 1
    try:
        reply = httpx.post(dashboard_url(host, port, LOGIN_CODES_PATH), headers={"Authorization": f"Bearer {token}"},
                           timeout=10)
    except httpx.HTTPError as exc:
        sys.stderr.write(f"flow-nexus-server: no dashboard answers at {dashboard_url(host, port, '')} ({exc}); start "
                         "one with 'flow-nexus-server dashboard'\n")
        return 1
    if reply.status_code != 200:
        where = dashboard_url(host, port, "")
        sys.stderr.write(f"flow-nexus-server: the server at {where} refused ({reply.status_code}): the token is not "
                         "the one it uses (--token-file, FLOW_NEXUS_TOKEN or <home>/http-token)\n")
        return 1
    body = reply.json()
    print(f"log in (one use, within {body['expires_in_s']:.0f} s): {dashboard_url(host, port, body['login_path'])}")
    return 0


def serve_http(settings: Settings, *, host: str, port: int, token: str,
               allowed_hosts: list[str] | None = None, show_dashboard: bool = False) -> int:
    """A front-end: MCP over streamable HTTP with a bearer token, forwarded to the home's controller.
    SIGTERM or Ctrl-C end this process only; the clusters run on in the controller."""
    import signal

    import uvicorn

    from flow_nexus_server.controller.channel import ControllerUnavailable, ensure_controller
    from flow_nexus_server.dashboard_access import DASHBOARD_PATH, LOGIN_PATH, DashboardAccess
    from flow_nexus_server.http_app import create_app

    def leave(signum: int, _frame: object) -> None:
        # Outside uvicorn's own handling (before it serves, and the signal it re-raises after its
        # graceful shutdown): nothing to clean up here, the controller holds the work.
        log.info("%s: the HTTP front-end leaves", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        paths = ensure_controller(settings)
    except ControllerUnavailable as exc:
        log.error("%s", exc)
        return 1
    access = DashboardAccess()
    app = create_app(paths, settings=settings, host=host, port=port, token=token, allowed_hosts=allowed_hosts,
                     access=access)
    if show_dashboard:
        # On stdout for the person who started it; never logged (the access log drops query strings).
        print(f"dashboard: {dashboard_url(host, port, DASHBOARD_PATH)}\n"
              f"log in (one use, within {access.code_ttl_s:.0f} s): "
              f"{dashboard_url(host, port, LOGIN_PATH)}?code={access.new_code()}\n"
              "another link later: flow-nexus-server dashboard --new-link", flush=True)
    logging.getLogger("uvicorn.access").addFilter(DropQueryStrings())
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on", timeout_graceful_shutdown=5,
                            ws="none", server_header=False)
    uvicorn.Server(config).run()
    log.info("HTTP front-end stopped; the controller keeps the clusters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
