"""``flow-nexus-server status`` and ``flow-nexus-server stop``: the controller, for people and scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from flow_nexus_server.config import DEFAULT_IDLE_TIMEOUT_MIN, Settings
from flow_nexus_server.controller.channel import (
    ControllerPaths,
    ControllerUnavailable,
    control_request,
    ensure_controller,
    running,
)


def store_view(store: Any, home: Path) -> dict[str, Any]:
    """The home's live clusters with their nodes, and its running sessions, as the store records
    them: what ``status`` shows (the controller adds its pid and attached front-ends)."""
    from flow_nexus_server.states import ClusterState, SessionState
    from flow_nexus_server.store import Cluster, Node, TrainingSession

    with store.session() as s:
        clusters = list(s.scalars(select(Cluster).where(Cluster.status != ClusterState.TERMINATED)
                                  .order_by(Cluster.created_at)))
        nodes = list(s.scalars(select(Node).where(Node.cluster_id.in_([c.id for c in clusters])).order_by(Node.seq)))
        sessions = list(s.scalars(select(TrainingSession).where(TrainingSession.status == SessionState.RUNNING)))
    return {
        "controller_pid": None, "home": str(home), "frontends": 0,
        "clusters": [{
            "cluster_id": c.id, "name": c.name, "status": c.status, "launcher": c.launcher,
            "idle_timeout_min": c.options.get("idle_timeout_min", DEFAULT_IDLE_TIMEOUT_MIN),
            "nodes": [{"node_id": n.id, "role": n.role, "status": n.status, "pid": n.pid, "rank": n.rank}
                      for n in nodes if n.cluster_id == c.id],
        } for c in clusters],
        "sessions": [{"session_id": t.id, "cluster_id": t.cluster_id, "status": t.status} for t in sessions],
    }


def _stored_view(settings: Settings) -> dict[str, Any]:
    """Without a controller: what the store says (clusters are then re-attached by the next one)."""
    from flow_nexus_server.store import Store

    if not (settings.home / "state.db").exists() and settings.db_url.startswith("sqlite"):
        return {"controller_pid": None, "home": str(settings.home), "frontends": 0, "clusters": [], "sessions": []}
    store = Store(settings.db_url)
    try:
        return store_view(store, settings.home)
    finally:
        store.close()


def status_command(settings: Settings, *, as_json: bool) -> int:
    paths = ControllerPaths(settings.home)
    try:
        view = control_request(paths, "GET", "/status") if running(paths) else _stored_view(settings)
    except httpx.HTTPError as exc:
        sys.stderr.write(f"flow-nexus-server: the controller did not answer: {exc}\n")
        return 1
    if as_json:
        print(json.dumps(view, indent=2))
        return 0
    pid = view["controller_pid"]
    print(f"home {view['home']}: " + (f"controller pid {pid}, {view.get('frontends', 0)} front-end(s) attached"
                                       if pid else "no controller running"))
    if not view["clusters"]:
        print("no clusters")
    for c in view["clusters"]:
        print(f"cluster {c['cluster_id']} ({c['name']}): {c['status']}, launcher {c['launcher']}")
        for n in c["nodes"]:
            print(f"  node {n['node_id']} {n['role']:<16} {n['status']:<9} pid {n['pid']}")
    for t in view["sessions"]:
        print(f"session {t['session_id']} on {t['cluster_id']}: {t['status']}")
    return 0


def stop_command(settings: Settings, *, cluster_id: str | None, stop_all: bool) -> int:
    paths = ControllerPaths(settings.home)
    if stop_all and not running(paths) and not _stored_view(settings)["clusters"]:
        print("nothing to stop: no controller and no cluster")
        return 0
    try:
        ensure_controller(settings)  # it re-attaches the nodes it stops
        body = {"all": True} if stop_all else {"cluster_ids": [cluster_id]}
        reply = control_request(paths, "POST", "/stop", json=body)
    except (ControllerUnavailable, httpx.HTTPError) as exc:
        sys.stderr.write(f"flow-nexus-server: {exc}\n")
        return 1
    for cid in reply["stopped"]:
        print(f"stopped cluster {cid}")
    for cid, error in reply["errors"].items():
        sys.stderr.write(f"flow-nexus-server: {cid}: {error}\n")
    if stop_all:
        print(f"controller pid {reply['controller_pid']} stops")
    return 1 if reply["errors"] else 0


def stop_everything(settings: Settings, timeout_s: float = 60.0) -> None:
    """Stop every cluster of the home and wait for its controller to leave (the demo's clean-up)."""
    import time

    paths = ControllerPaths(settings.home)
    if not running(paths):
        return
    try:
        control_request(paths, "POST", "/stop", json={"all": True})
    except httpx.HTTPError:
        return
    deadline = time.monotonic() + timeout_s
    while running(paths) and time.monotonic() < deadline:
        time.sleep(0.1)
