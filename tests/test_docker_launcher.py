"""The docker launcher's container spec, and a clear refusal where no engine answers."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
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
