"""Docker launcher: one container per node from the worker image (docker/Dockerfile.worker).

The node's sandbox is mounted at /sandbox, so the agent's ready file, data, checkpoints and log
land in the same place as with local processes. The cluster token reaches the container as
``-e FLOW_NEXUS_NODE_TOKEN`` with no value on the command line: docker copies it from the
environment of the `docker run` process, so `ps` never shows it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass

from flow_nexus_server.config import Settings
from flow_nexus_server.launchers.base import LaunchError, NodeHandle, NodeSpec, controller_args, log_tail
from workers.protocol import READY_FILE, TOKEN_ENV

SANDBOX_IN_CONTAINER = "/sandbox"


@dataclass
class DockerLauncher:
    image: str = Settings.model_fields["docker_image"].default
    network: str = Settings.model_fields["docker_network"].default
    docker: str = "docker"
    name: str = "docker"

    def available(self) -> tuple[bool, str]:
        try:
            proc = subprocess.run([self.docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                  text=True, timeout=10)
        except FileNotFoundError:
            return False, "the docker command is not installed on this host"
        except subprocess.TimeoutExpired:
            return False, "the Docker engine did not answer within 10 s"
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            return False, "no Docker engine answers on this host" + (f" ({detail[-1]})" if detail else "")
        return True, ""

    def container_name(self, spec: NodeSpec) -> str:
        return f"flow-nexus-{spec.cluster_id}-{spec.node_id}"

    def run_command(self, spec: NodeSpec) -> list[str]:
        """The `docker run` argv: image, env names (values come from the environment), volume, network,
        CPUs and GPUs (whole devices: docker cannot share one)."""
        return [
            self.docker, "run", "--detach", "--init",
            "--name", self.container_name(spec),
            "--network", self.network,
            "--label", f"flow-nexus.cluster={spec.cluster_id}",
            "--label", f"flow-nexus.node={spec.node_id}",
            "--env", TOKEN_ENV,  # name only: the value is taken from this process's environment
            "--env", "FLOW_NEXUS_LEASE_GRACE_S",  # the node's lease grace, when set here (else unset there)
            "--env", f"OMP_NUM_THREADS={spec.threads}",
            "--volume", f"{spec.sandbox}:{SANDBOX_IN_CONTAINER}",
            "--cpus", f"{spec.num_cpus:g}",
            *(["--gpus", str(math.ceil(spec.num_gpus))] if spec.num_gpus > 0 else []),
            self.image,
            "--node-id", spec.node_id, "--cluster-id", spec.cluster_id, "--role", spec.role,
            # No --allowed-root: inside the container a node sees its sandbox alone.
            "--sandbox", SANDBOX_IN_CONTAINER, "--threads", str(spec.threads),
            "--host", "127.0.0.1" if self.network == "host" else "0.0.0.0",
            *controller_args(spec),
        ]

    def run_environment(self, spec: NodeSpec) -> dict[str, str]:
        return {**os.environ, TOKEN_ENV: spec.token}

    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        ok, reason = self.available()
        if not ok:
            raise LaunchError(reason)
        spec.sandbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        (spec.sandbox / READY_FILE).unlink(missing_ok=True)
        proc = subprocess.run(self.run_command(spec), env=self.run_environment(spec), capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise LaunchError(f"docker run failed: {proc.stderr.strip()}")
        container = proc.stdout.strip()
        handle = NodeHandle(spec.node_id, "127.0.0.1", 0, None, container)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive, code = self.is_alive(handle)
            if not alive:
                logs = subprocess.run([self.docker, "logs", "--tail", "20", container], capture_output=True, text=True)
                raise LaunchError(f"container {container[:12]} exited with code {code}: {logs.stdout}{logs.stderr}")
            ready = spec.sandbox / READY_FILE
            if ready.exists():
                info = json.loads(ready.read_text())
                return NodeHandle(spec.node_id, "127.0.0.1", int(info["port"]), None, container)
            time.sleep(0.1)
        self.terminate(handle, grace_s=1)
        raise LaunchError(f"container {container[:12]} did not start listening within {timeout_s:.0f} s; "
                          f"{log_tail(spec.sandbox / 'node.log', 20)}")

    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        proc = subprocess.run(
            [self.docker, "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", handle.ref],
            capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return False, None
        running, code = proc.stdout.split()
        return running == "true", None if running == "true" else int(code)

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        subprocess.run([self.docker, "stop", "--time", str(int(grace_s)), handle.ref], capture_output=True, timeout=60)
        subprocess.run([self.docker, "rm", "--force", handle.ref], capture_output=True, timeout=60)
        return not self.is_alive(handle)[0]


class UnavailableLauncher:
    """Stands for a launcher whose dependency is missing; says how to install it."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def available(self) -> tuple[bool, str]:
        return False, self.reason

    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        raise LaunchError(self.reason)

    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        return False, None

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        return True
