"""The scripted clients in examples/ run against a real server and print what they did."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT, server_env

EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def check_flow_output(out: str, name: str) -> str:
    """The example listed the tools, created a cluster and found it in the list; returns its id."""
    tools = re.search(r"^tools \((\d+)\): (.+)$", out, re.M)
    assert tools, out
    listed_tools = tools.group(2).split(", ")
    assert int(tools.group(1)) == len(listed_tools)
    assert {"neural_cluster_init", "neural_cluster_list", "neural_node_deploy"} <= set(listed_tools)
    created = re.search(rf"^created cluster (dnc_\w+) \({re.escape(name)}, ring, status initializing\)$", out, re.M)
    assert created, out
    cid = created.group(1)
    assert re.search(rf"^  {cid} {re.escape(name)} initializing topology=ring nodes=0$", out, re.M), out
    return cid


def test_http_client_example(http_server):
    env = server_env(http_server.home)
    proc = run_example("http_client.py", "--url", http_server.url, f"--token={http_server.token}",
                       "--name", "from-http-example", env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^initialized: flow-nexus-server \S+ protocol 2025-11-25 session [0-9a-f]+$",
                     proc.stdout, re.M), proc.stdout
    cid = check_flow_output(proc.stdout, "from-http-example")
    assert re.search(r"^clusters \(1\):$", proc.stdout, re.M), proc.stdout

    # The cluster really exists on the server, and the progress token did not upset it.
    again = run_example("http_client.py", "--url", http_server.url, f"--token={http_server.token}",
                        "--name", "second", env=env)
    assert again.returncode == 0, again.stderr
    assert cid in again.stdout and re.search(r"^clusters \(2\):$", again.stdout, re.M), again.stdout


def test_http_client_example_with_a_wrong_token(http_server):
    proc = run_example("http_client.py", "--url", http_server.url, "--token=wrong",
                       env=server_env(http_server.home))
    assert proc.returncode == 1
    assert "401" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "created cluster" not in proc.stdout


def test_stdio_client_example(home):
    env = server_env(home)  # FLOW_NEXUS_HOME is handed on to the spawned server
    proc = run_example("stdio_client.py", "--name", "from-stdio-example", env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^connected over stdio, protocol \S+$", proc.stdout, re.M), proc.stdout
    cid = check_flow_output(proc.stdout, "from-stdio-example")
    assert re.search(r"^clusters \(1\):$", proc.stdout, re.M), proc.stdout
    assert (home / "clusters" / cid).is_dir(), "the spawned server did not use FLOW_NEXUS_HOME"

    # --home points the spawned server at another state home.
    other = home.parent / "other-home"
    proc = run_example("stdio_client.py", "--home", str(other), "--name", "elsewhere", env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^clusters \(1\):$", proc.stdout, re.M) and cid not in proc.stdout, proc.stdout
