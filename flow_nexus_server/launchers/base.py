"""The launcher interface: start, poll and stop node processes, wherever they run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class LaunchError(RuntimeError):
    """A node did not start; the message carries the reason (and the end of its log)."""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    cluster_id: str
    role: str
    sandbox: Path
    token: str
    threads: int = 1
    # Resources a node reserves from the deploy call: ray puts them in its placement-group bundle
    # and actor options, docker passes --cpus / --gpus; local processes share the host.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Directories outside its sandbox whose files clients may name to the node (the server's allowed
    # roots); the node refuses every other path (workers/paths.py). Empty: the sandbox only.
    allowed_roots: tuple[Path, ...] = ()
    # Where the node pushes its telemetry and holds its lease (service.telemetry); None: neither.
    controller_url: str | None = None
    # Nice increment a local node applies to itself (workers/priority.py); 0: normal priority.
    cpu_nice: int = 0


def allowed_root_args(spec: NodeSpec) -> list[str]:
    """``--allowed-root DIR`` for each of the spec's roots, for the agent's command line."""
    return [arg for root in spec.allowed_roots for arg in ("--allowed-root", str(root))]


def controller_args(spec: NodeSpec) -> list[str]:
    """``--controller-url URL`` when the spec names a controller, for the agent's command line."""
    return ["--controller-url", spec.controller_url] if spec.controller_url else []


@dataclass
class NodeHandle:
    node_id: str
    host: str  # address of the node's control API
    port: int
    pid: int | None
    ref: str  # launcher-specific: pid, container id, actor id


class NodeLauncher(Protocol):
    name: str

    def available(self) -> tuple[bool, str]:
        """(usable now?, the reason when not)."""

    def launch(self, spec: NodeSpec, timeout_s: float) -> NodeHandle:
        """Start the node and return once its control API listens; raise LaunchError otherwise."""

    def is_alive(self, handle: NodeHandle) -> tuple[bool, int | None]:
        """(alive?, exit code when known)."""

    def terminate(self, handle: NodeHandle, grace_s: float = 5.0) -> bool:
        """Stop the node (graceful, then forced); True once it is verifiably gone."""


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file, or '' when it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""
