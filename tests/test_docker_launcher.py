"""The docker launcher's container spec, and a clear refusal where no engine answers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.launchers import NodeSpec
from flow_nexus_server.launchers.docker import DockerLauncher
from flow_nexus_server.server import build_server
from workers.protocol import TOKEN_ENV

TOKEN = "s3cret" * 8


def spec(tmp_path: Path) -> NodeSpec:
    return NodeSpec("node_abcd1234", "dnc_0123456789ab", "worker", tmp_path / "sandbox", TOKEN, threads=1)


def test_container_spec(tmp_path):
    launcher = DockerLauncher(image="registry.local/fnx-worker:1", network="host")
    argv = launcher.run_command(spec(tmp_path))
    assert argv[:3] == ["docker", "run", "--detach"]
    assert "registry.local/fnx-worker:1" in argv
    assert argv[argv.index("--network") + 1] == "host"
    assert argv[argv.index("--volume") + 1] == f"{tmp_path / 'sandbox'}:/sandbox"
    assert argv[argv.index("--sandbox") + 1] == "/sandbox"
    assert TOKEN not in " ".join(argv), "the token must not be on the command line"
    assert TOKEN_ENV in argv  # passed by name; the value comes from the environment
    assert launcher.run_environment(spec(tmp_path))[TOKEN_ENV] == TOKEN
    assert "--label" in argv and "flow-nexus.cluster=dnc_0123456789ab" in argv


def test_container_reserves_the_cpus_and_whole_gpus_of_the_deploy_call(tmp_path):
    plain = DockerLauncher().run_command(spec(tmp_path))
    assert plain[plain.index("--cpus") + 1] == "1" and "--gpus" not in plain
    gpu = NodeSpec("node_abcd1234", "dnc_0123456789ab", "worker", tmp_path / "sandbox", TOKEN,
                   num_cpus=2.5, num_gpus=0.5)
    argv = DockerLauncher(image="img").run_command(gpu)
    assert argv[argv.index("--cpus") + 1] == "2.5"
    assert argv[argv.index("--gpus") + 1] == "1"  # docker hands out whole devices
    assert argv.index("--gpus") < argv.index("img"), "docker options go before the image"


def test_bridge_network_binds_all_interfaces_inside_the_container(tmp_path):
    argv = DockerLauncher(network="bridge").run_command(spec(tmp_path))
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.anyio
@pytest.mark.skipif(engine_answers(), reason="a Docker engine answers here; the refusal cannot be observed")
async def test_init_without_engine_is_a_clear_error(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        result = await client.call_tool("neural_cluster_init", {"name": "d", "launcher": "docker"})
        assert result.is_error
        text = result.content[0].text
        assert "docker" in text and ("engine" in text or "not installed" in text)
        listed = await client.call_tool("neural_cluster_list", {})
        assert listed.structured_content["count"] == 0


@pytest.mark.anyio
@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
async def test_ray_missing_says_how_to_install(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        result = await client.call_tool("neural_cluster_init", {"name": "r", "launcher": "ray"})
        assert result.is_error and "pip install 'flow-nexus-server[ray]'" in result.content[0].text


# ------------------------------------------------------------------ a fake engine at the CLI boundary
# This machine has the docker client but no engine. tests/fixtures/fake_docker/docker answers the
# CLI calls the launcher makes and runs each "container" of the worker image as a local process
# with a container's clean environment; the tests check the exact commands, the environment
# (the token by name only), the sandbox mount and the clean-up, and that the nodes train.

FAKE_ENGINE = Path(__file__).parent / "fixtures" / "fake_docker"


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    state = tmp_path / "fake-docker"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE_ENGINE}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    monkeypatch.setenv("FAKE_DOCKER_PYTHON", sys.executable)
    yield state
    for meta in (state / "containers").glob("*.json"):  # a failed test leaves nothing running
        c = json.loads(meta.read_text())
        for pid in (c["pid"], c["shim"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def engine_calls(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def stored_token(home: Path, cluster_id: str) -> str:
    from flow_nexus_server.store import Store

    store = Store(Settings.from_env(home).db_url)
    try:
        return store.cluster(cluster_id).token
    finally:
        store.close()


@pytest.mark.anyio
async def test_fake_engine_runs_trains_and_removes_containers(home, fake_engine):
    from conftest import ok, pid_alive

    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "boxes", "launcher": "docker",
                                                         "architecture": "mlp"}))["cluster_id"]
        nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2}))["nodes"]
        assert [n["status"] for n in nodes] == ["deployed"] * 2
        containers = {c["name"]: c for c in (json.loads(p.read_text())
                                             for p in (fake_engine / "containers").glob("*.json"))}
        token = stored_token(home, cid)
        for n in nodes:
            c = containers[f"flow-nexus-{cid}-{n['node_id']}"]
            assert pid_alive(c["pid"]) and token.encode() not in Path(f"/proc/{c['pid']}/cmdline").read_bytes()
        conn = await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        assert conn["nodes_connected"] == 2
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 2,
                                                             "learning_rate": 0.003, "wait": True})
        assert run["status"] == "completed" and run["result"]["metrics"]["val_accuracy"] >= 0.7, run
        term = await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        assert term["success"] and term["nodes_terminated"] == 2

    calls = engine_calls(fake_engine)
    runs = {c["argv"][c["argv"].index("--name") + 1]: c for c in calls if c["argv"][0] == "run"}
    assert len(runs) == 2
    for n in nodes:  # deployed side by side: the calls come in any order
        nid = n["node_id"]
        call = runs[f"flow-nexus-{cid}-{nid}"]
        argv = call["argv"]
        assert argv[:-1] == [
            "run", "--detach", "--init", "--name", f"flow-nexus-{cid}-{nid}", "--network", "host",
            "--label", f"flow-nexus.cluster={cid}", "--label", f"flow-nexus.node={nid}",
            "--env", TOKEN_ENV, "--env", "FLOW_NEXUS_LEASE_GRACE_S", "--env", "OMP_NUM_THREADS=1",
            "--volume", f"{n['sandbox_path']}:/sandbox", "--cpus", "1", "flow-nexus-worker:latest",
            "--node-id", nid, "--cluster-id", cid, "--role", "worker", "--sandbox", "/sandbox",
            "--threads", "1", "--host", "127.0.0.1", "--controller-url"]
        assert argv[-1].startswith("http://127.0.0.1:")
        assert TOKEN_ENV in call["env_names"], "docker run must get the token in its environment"
    assert not any(token in " ".join(c["argv"]) for c in calls), "the token reached a command line"
    # Clean-up: every container was stopped with a grace period, then removed; nothing runs.
    ids = [c["argv"][-1] for c in calls if c["argv"][0] == "rm"]
    assert len(ids) == 2
    for cid_ in ids:
        assert ["stop", "--time", "5", cid_] in [c["argv"] for c in calls]
        assert ["rm", "--force", cid_] in [c["argv"] for c in calls]
    assert not list((fake_engine / "containers").glob("*.json"))
    assert not any(pid_alive(c["pid"]) for c in containers.values())
