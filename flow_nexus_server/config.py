"""Settings read from the environment once, at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


# The longest tool arguments, in characters (the tools' JSON Schemas say the same; the dataset's is
# workers.protocol.MAX_DATASET_CHARS).
MAX_UPLOAD_CHARS = 4 * -(-(8 << 20) // 3)  # neural_node_upload content: 8 MiB as base64 (11,184,812)
# HTTP request bodies: room for either argument even when JSON escaping doubles it (or triples
# an 8 MiB upload of non-ASCII text sent as \uXXXX escapes).
HTTP_MAX_BODY_BYTES = 32 << 20


DEFAULT_IDLE_TIMEOUT_MIN = 30.0  # neural_cluster_init's idle_timeout_min when a cluster has none


@dataclass(frozen=True)
class Limits:
    """Ceilings that protect the host; each is overridable by an environment variable."""

    max_nodes_per_cluster: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_NODES_PER_CLUSTER", 16))
    max_clusters: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_CLUSTERS", 32))
    max_node_processes: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_NODE_PROCESSES", 32))
    max_sandbox_bytes: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_SANDBOX_BYTES", 256 << 20))
    max_upload_bytes: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_UPLOAD_BYTES", 8 << 20))
    max_inline_dataset_bytes: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_INLINE_BYTES", 4 << 20))
    max_epochs: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_EPOCHS", 1000))
    max_batch_size: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_MAX_BATCH_SIZE", 512))
    node_memory_mb: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_NODE_MEMORY_MB", 400))


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    node_start_timeout_s: float = 90.0
    group_timeout_s: float = 30.0
    # Where nodes push telemetry (service.telemetry); 0: a port the OS picks.
    telemetry_port: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_TELEMETRY_PORT", 0))
    limits: Limits = field(default_factory=Limits)
    # How much local nodes lower their CPU priority (nice 0-19; 0 = none), so the controller and
    # front-ends answer promptly while nodes keep every core busy (workers/priority.py).
    node_nice: int = field(default_factory=lambda: _int_env("FLOW_NEXUS_NODE_NICE", 10))

    @property
    def allowed_roots(self) -> list[Path]:
        """Where dataset paths may be read and exports written: the state home plus FLOW_NEXUS_DATA_ROOTS."""
        extra = [Path(x).expanduser().resolve() for x in os.environ.get("FLOW_NEXUS_DATA_ROOTS", "").split(os.pathsep) if x]
        return [self.home, *extra]

    @property
    def clusters_dir(self) -> Path:
        return self.home / "clusters"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> "Settings":
        root = Path(home or os.environ.get("FLOW_NEXUS_HOME") or Path.home() / ".flow-nexus").expanduser()
        root = root.resolve()
        db_url = os.environ.get("FLOW_NEXUS_DB_URL") or f"sqlite:///{root / 'state.db'}"
        return cls(home=root, db_url=db_url)
