"""The Ray launcher across hosts: three network namespaces on a bridge stand for three machines.

Host ``a`` runs the Ray head and the server (its front-ends and controller), hosts ``b`` and
``c`` each run a Ray worker node (`ray start --address`). Every host has its own address
(``10.217.X.1-3``), and the server is told its own with ``FLOW_NEXUS_ADVERTISE_HOST`` as
docs/multi-host.md says. Everything goes through the MCP tools of a stdio front-end started
inside host ``a``. One Ray "cluster of namespaces" serves the whole module (it takes ~20 s to
start); tests that cut a host bring it back before they end.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, a kernel that
refuses) or Ray is missing (``pip install '.[ray]'``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

pytest.importorskip("ray")

from conftest import StdioRpc, controller_pid, pid_alive, server_command, server_env  # noqa: E402
from multihost import CannotSimulate, Host, SimulatedHosts  # noqa: E402

from workers.protocol import READY_FILE  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.multihost]

LOOPBACK = "127.0.0.1"
NODE_PORTS, TELEMETRY_PORT = "30000-30009", "30100"
DETECT_S = 10.0  # a cut host must be noticed within this (the bar)


@pytest.fixture(scope="module")
def hosts():
    sim = SimulatedHosts(3)
    try:
        sim.up()
    except CannotSimulate as exc:
        sim.down()
        pytest.skip(f"cannot simulate hosts with network namespaces here: {exc}")
    try:
        sim.start_cluster()
        yield sim
    finally:
        sim.down()  # kills Ray, the controller and every node actor inside the namespaces


@pytest.fixture(scope="module")
def state_home(tmp_path_factory, hosts):
    return tmp_path_factory.mktemp("multihost") / "home"


class Frontend:
    """A stdio front-end of the server inside host ``a``, configured as docs/multi-host.md says."""

    def __init__(self, sim: SimulatedHosts, home, **extra: str) -> None:
        env = {**server_env(home), "HOME": os.environ.get("HOME", "/root"),
               "FLOW_NEXUS_RAY_ADDRESS": sim.ray_address, "FLOW_NEXUS_ADVERTISE_HOST": sim.head.address,
               "FLOW_NEXUS_RAY_STRATEGY": "SPREAD", "GLOO_SOCKET_IFNAME": sim.head.ifname, **sim.ray_auth,
               # Pinned, as a firewall needs them (docs/multi-host.md, section 9).
               "FLOW_NEXUS_RAY_NODE_PORTS": NODE_PORTS, "FLOW_NEXUS_TELEMETRY_PORT": TELEMETRY_PORT, **extra}
        home.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = (home.parent / "frontend.stderr").open("ab")
        self.proc = subprocess.Popen(sim.command(sim.head, server_command()), env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.rpc = StdioRpc(self.proc)
        self.rpc.initialize()

    def tool(self, name: str, args: dict) -> dict:
        result = self.rpc.send("tools/call", {"name": name, "arguments": args})["result"]
        assert not result.get("isError"), f"{name} failed: {result['content'][0]['text']}"
        return result["structuredContent"]

    def terminate_quietly(self, cluster_id: str) -> None:
        """Clean-up after a failed test: free the hosts' CPUs for the next test (errors ignored)."""
        if self.proc.poll() is None:
            self.rpc.send("tools/call", {"name": "neural_cluster_terminate", "arguments": {"cluster_id": cluster_id}})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def live_hosts(hosts):
    """The three hosts, each with a live Ray node: hosts an earlier test cut come back first."""
    hosts.restore()
    return hosts


@pytest.fixture
def front(live_hosts, state_home):
    server = Frontend(live_hosts, state_home)
    try:
        yield server
    finally:
        server.close()


def host_of(sim: SimulatedHosts, address: str) -> Host:
    """The simulated host whose node reports this control-API address (127.0.0.1: the server's)."""
    return sim.head if address == LOOPBACK else next(h for h in sim.hosts if h.address == address)


def digits_batch(n: int = 100) -> str:
    from workers.data import load_dataset, train_val_split

    ds = load_dataset("digits")
    _, val = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
    return json.dumps({"inputs": ds.X[val[:n]].tolist(), "labels": ds.y[val[:n]].tolist()})


def spread_cluster(front: Frontend, sim: SimulatedHosts, name: str, **init) -> tuple[str, dict[str, Host]]:
    """A cluster of one worker per host (SPREAD), connected; its node ids -> host."""
    cid = front.tool("neural_cluster_init", {"name": name, "launcher": "ray", "architecture": "mlp",
                                             **init})["cluster_id"]
    try:
        deploy = front.tool("neural_node_deploy", {"cluster_id": cid, "count": len(sim.hosts)})
        assert [n["status"] for n in deploy["nodes"]] == ["deployed"] * len(sim.hosts), deploy
        status = front.tool("neural_cluster_status", {"cluster_id": cid})
        where = {n["node_id"]: host_of(sim, n["host"]) for n in status["nodes"]}
        assert sorted(h.name for h in where.values()) == [h.name for h in sim.hosts], \
            f"SPREAD should put one node on each host: {[(n, h.name) for n, h in where.items()]}"
    except BaseException:
        front.terminate_quietly(cid)
        raise
    return cid, where


def wait_session(front: Frontend, session_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        done = front.tool("neural_training_status", {"session_id": session_id})
        if done["status"] != "running" or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def kill_host_mid_session(front: Frontend, sim: SimulatedHosts, cid: str, victim: Host,
                          cut=None) -> float:
    """Once the session has trained two epochs, take ``victim`` away; when it happened."""
    for _ in range(600):
        status = front.tool("neural_cluster_status", {"cluster_id": cid})
        if (status.get("current_epoch") or 0) >= 2:
            break
        time.sleep(0.1)
    assert status["training"]["status"] == "running", "the session ended before the host was cut"
    (cut or sim.power_off)(victim)
    return time.monotonic()


def wait_node_down(front: Frontend, node_id: str, since: float) -> float:
    """Seconds from ``since`` until the server marks the node failed or lost (gives up after 30 s)."""
    while time.monotonic() - since < 30:
        state = front.tool("neural_node_logs", {"node_id": node_id, "tail": 1})["status"]
        if state in ("failed", "lost"):
            return time.monotonic() - since
        time.sleep(0.2)
    raise AssertionError(f"node {node_id} on the cut host was still {state!r} 30 s later")


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(hosts, state_home):
    """One auto-healing cluster of a worker per host, shared by the default tests (deploying Ray
    actors is the slow part: each starts a Python process with torch); (cluster id, node -> host)."""
    hosts.restore()
    server = Frontend(hosts, state_home)
    try:
        cluster = spread_cluster(server, hosts, "wide", auto_healing=True)
    finally:
        server.close()
    yield cluster
    server = Frontend(hosts, state_home)
    try:
        server.terminate_quietly(cluster[0])
    finally:
        server.close()


def test_spread_nodes_connect_train_and_predict_across_hosts(front, hosts, wide, state_home):
    cid, where = wide
    for node_id in where:  # each control API took a port of the pinned range, on every host
        ready = state_home / "clusters" / cid / "nodes" / node_id / READY_FILE
        assert int(json.loads(ready.read_text())["port"]) in range(30000, 30010)
    conn = front.tool("neural_cluster_connect", {"cluster_id": cid})
    assert conn["nodes_connected"] == 3
    # Every measured edge joins two different hosts: the probe crossed the bridge.
    assert conn["edges"], conn
    for edge in conn["edges"]:
        assert where[edge["from_node"]] is not where[edge["to_node"]]
        assert edge["status"] == "active" and edge["latency_ms"] > 0 and edge["bandwidth_mbps"] > 0, edge

    sync = front.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 2,
                                                  "learning_rate": 0.003, "wait": True})
    assert sync["status"] == "completed", sync
    assert sync["nodes_training"] == 3 and sync["result"]["metrics"]["val_accuracy"] >= 0.7, sync["result"]
    pred = front.tool("neural_predict_distributed", {"cluster_id": cid, "input_data": digits_batch(),
                                                     "quantized": False})
    assert pred["nodes_used"] == 3 and pred["metrics"]["accuracy"] >= 0.7, pred["metrics"]

    fed = front.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "federated": True,
                                                 "rounds": 3, "local_epochs": 1, "learning_rate": 0.003,
                                                 "wait": True})
    assert fed["status"] == "completed" and fed["config"]["mode"] == "federated", fed
    assert fed["result"]["metrics"]["val_accuracy"] >= 0.7, fed["result"]


def test_killed_host_is_detected_and_auto_healing_replaces_its_node(front, hosts, wide):
    cid, where = wide
    if front.tool("neural_cluster_status", {"cluster_id": cid})["status"] != "connected":
        front.tool("neural_cluster_connect", {"cluster_id": cid})
    victim_host = hosts.hosts[2]
    victim = next(n for n, h in where.items() if h is victim_host)
    run = front.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 8,
                                                 "batch_size": 32, "learning_rate": 0.01, "checkpoint_every": 2})
    cut_at = kill_host_mid_session(front, hosts, cid, victim_host)
    detected_s = wait_node_down(front, victim, cut_at)
    print(f"host {victim_host.name} powered off: node {victim} marked down after {detected_s:.1f} s")
    done = wait_session(front, run["session_id"])
    assert detected_s <= DETECT_S, f"the dead host was noticed only after {detected_s:.1f} s"
    assert done["status"] == "completed", done.get("error")
    assert done["live"]["restarts"] == 1 and done["final_metrics"]["val_accuracy"] >= 0.9, done
    status = front.tool("neural_cluster_status", {"cluster_id": cid})
    running = [n for n in status["nodes"] if n["status"] == "running"]
    assert {n["node_id"]: n["status"] for n in status["nodes"]}[victim] in ("failed", "lost")
    assert len(running) == 3 and victim not in {n["node_id"] for n in running}
    # The replacement runs on a surviving host (the cut one was gone while it was placed).
    assert all(host_of(hosts, n["host"]) is not victim_host for n in running)
    term = front.tool("neural_cluster_terminate", {"cluster_id": cid})
    assert term["success"] and term["nodes_terminated"] == 3


@pytest.mark.slow
@pytest.mark.multihostslow
def test_controller_restart_reattaches_nodes_on_other_hosts(live_hosts, state_home):
    hosts = live_hosts
    first = Frontend(hosts, state_home)
    cid, where = spread_cluster(first, hosts, "survivor")
    try:
        first.tool("neural_cluster_connect", {"cluster_id": cid})
        old = controller_pid(state_home)
        assert old is not None
        os.kill(old, signal.SIGKILL)  # no clean-up runs: the actors on the three hosts live on
        deadline = time.monotonic() + 30
        while pid_alive(old) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        first.close()
    second = Frontend(hosts, state_home)
    try:
        assert controller_pid(state_home) not in (None, old)
        status = second.tool("neural_cluster_status", {"cluster_id": cid})
        assert {n["node_id"]: n["alive"] for n in status["nodes"]} == {n: True for n in where}
        conn = second.tool("neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 3
        run = second.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 1,
                                                      "learning_rate": 0.003, "wait": True})
        assert run["status"] == "completed", run
        term = second.tool("neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 3
    finally:
        second.terminate_quietly(cid)
        second.close()


@pytest.mark.slow
@pytest.mark.multihostslow
def test_link_down_fails_the_session_naming_the_node(front, hosts):
    cid, where = spread_cluster(front, hosts, "cut")
    try:
        link_down_scenario(front, hosts, cid, where)
    finally:
        front.terminate_quietly(cid)


def link_down_scenario(front: Frontend, hosts: SimulatedHosts, cid: str, where: dict[str, Host]) -> None:
    front.tool("neural_cluster_connect", {"cluster_id": cid})
    victim_host = hosts.hosts[1]
    victim = next(n for n, h in where.items() if h is victim_host)
    run = front.tool("neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 30,
                                                 "batch_size": 32, "learning_rate": 0.01})
    cut_at = kill_host_mid_session(front, hosts, cid, victim_host, cut=lambda h: hosts.set_link(h, up=False))
    detected_s = wait_node_down(front, victim, cut_at)
    print(f"host {victim_host.name} link down: node {victim} marked down after {detected_s:.1f} s")
    done = wait_session(front, run["session_id"], timeout_s=120)
    assert done["status"] == "failed" and victim in done["error"], done
    # Silence decides for a cut link: NODE_SILENT_S (10 s) after the last push, plus one pass.
    assert detected_s <= DETECT_S + 2, f"the cut link was noticed only after {detected_s:.1f} s"
    term = front.tool("neural_cluster_terminate", {"cluster_id": cid})
    assert term["success"]
