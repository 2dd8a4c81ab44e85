"""Settings: every ``FLOW_NEXUS_*`` environment variable the server reads, read once at start-up.

``Settings.from_env`` reads them; the services, launchers and the controller take their values
from the object it returns and never read the environment themselves. docs/settings.md is
generated from these models (``settings_markdown``, ``flow-nexus-server settings --markdown``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The longest tool arguments, in characters (the tools' JSON Schemas say the same; the dataset's is
# workers.protocol.MAX_DATASET_CHARS).
MAX_UPLOAD_CHARS = 4 * -(-(8 << 20) // 3)  # neural_node_upload content: 8 MiB as base64 (11,184,812)
# HTTP request bodies: room for either argument even when JSON escaping doubles it (or triples
# an 8 MiB upload of non-ASCII text sent as \uXXXX escapes).
HTTP_MAX_BODY_BYTES = 32 << 20


DEFAULT_IDLE_TIMEOUT_MIN = 30.0  # neural_cluster_init's idle_timeout_min when a cluster has none

ENV_PREFIX = "FLOW_NEXUS_"
# An empty variable counts as unset (as it always did); values are stripped.
_FROM_ENV = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, str_strip_whitespace=True, frozen=True)


class Limits(BaseSettings):
    """Ceilings that protect the host."""

    model_config = _FROM_ENV

    max_nodes_per_cluster: int = Field(100, description="Largest max_nodes neural_cluster_init accepts (the host's "
                                       "memory and FLOW_NEXUS_MAX_NODE_PROCESSES still decide each deploy)")
    max_clusters: int = Field(32, description="Clusters that may be active at once")
    max_node_processes: int = Field(32, description="Node processes this server may run at once, all clusters together")
    max_sandbox_bytes: int = Field(256 << 20, description="Bytes a node's sandbox may hold (uploads and checkpoints)")
    max_upload_bytes: int = Field(8 << 20, description="Bytes of one file sent with neural_node_upload")
    max_inline_dataset_bytes: int = Field(
        4 << 20, validation_alias=AliasChoices(f"{ENV_PREFIX}MAX_INLINE_BYTES", "max_inline_dataset_bytes"),
        description="Bytes of a dataset given inline (JSON or CSV text) to neural_train_distributed")
    max_epochs: int = Field(1000, description="Most epochs (or federated rounds) one training session may ask for")
    max_batch_size: int = Field(512, description="Largest batch_size a training session may ask for")
    node_memory_mb: int = Field(400, description="Memory each node's training may use besides the node's runtime, "
                                "when neural_node_deploy names no memory_mb")


class Settings(BaseSettings):
    """What the server reads from FLOW_NEXUS_* (docs/settings.md); ``limits`` holds the ceilings."""

    model_config = _FROM_ENV

    home: Path = Field(Path("~/.flow-nexus"), validate_default=True,
                       description="State home: database, logs and node sandboxes (--home overrides it)")
    db_url: str = Field("", validate_default=True,
                        description="SQLAlchemy URL of the state database; unset: sqlite:///<home>/state.db")
    data_roots: Annotated[tuple[Path, ...], NoDecode] = Field(
        (), description="Directories besides the home where dataset paths may be read and exports written, "
                        f"separated by '{os.pathsep}'")
    token: SecretStr | None = Field(None, description="Bearer token of the HTTP transport (--token-file overrides "
                                    "it); unset: one generated into <home>/http-token")
    telemetry_port: int = Field(0, description="Port where nodes push their health and progress; 0: one the OS picks")
    advertise_host: str = Field("", description="An address of this host that nodes on other machines reach "
                                "(telemetry, rendezvous store); unset: 127.0.0.1, nodes on this host only")
    rendezvous_bind: str = Field("0.0.0.0", description="Where a first node on this host binds the cluster's "
                                 "rendezvous store when advertise_host is set")
    spawner: Literal["warm", "plain"] = Field("warm", description="Local nodes: forked from a warm template "
                                              "(Linux) or plain, one cold interpreter per node")
    docker_image: str = Field("flow-nexus-worker:latest", description="Image of docker-launched nodes "
                              "(docker/Dockerfile.worker)")
    docker_network: str = Field("host", description="Docker network of docker-launched nodes")
    ray_address: str = Field("", description="Ray cluster to join (ray.init address); unset: the local Ray "
                             "instance, started when none runs")
    ray_strategy: str = Field("PACK", description="Placement of a Ray cluster's nodes: PACK or SPREAD")
    ray_node_ports: str = Field("", description="Ports Ray actors' control APIs may listen on, like "
                                "30000-30099 or 30000,30001; unset: any")
    ray_ship_workers: bool = Field(False, description="Ship this checkout's workers/ package to Ray nodes "
                                   "(runtime_env) instead of using the one installed there")
    controller_linger_s: float = Field(10.0, description="Seconds the controller stays with no cluster, "
                                       "session or front-end before it stops")
    node_start_timeout_s: float = Field(90.0, description="Seconds a node may take to start listening")
    group_timeout_s: float = Field(30.0, description="Seconds a cluster's nodes may take to form their group")
    node_nice: int = Field(10, ge=0, le=19, description="How much local nodes lower their CPU priority (nice), so "
                           "the controller and front-ends answer promptly while nodes keep every core busy; 0: none")
    limits: Limits = Field(default_factory=Limits, description="Ceilings that protect the host")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @field_validator("db_url")
    @classmethod
    def _db_in_home(cls, url: str, info: ValidationInfo) -> str:
        return url or f"sqlite:///{info.data['home'] / 'state.db'}"

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, roots: Any) -> Any:
        if isinstance(roots, str):
            roots = [x for x in roots.split(os.pathsep) if x.strip()]
        return tuple(Path(x).expanduser().resolve() for x in roots)

    @property
    def allowed_roots(self) -> list[Path]:
        """Where dataset paths may be read and exports written: the state home plus data_roots."""
        return [self.home, *self.data_roots]

    @property
    def clusters_dir(self) -> Path:
        return self.home / "clusters"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> Settings:
        """The settings from the environment; ``home`` (--home) overrides FLOW_NEXUS_HOME."""
        try:
            return cls(home=home) if home else cls()
        except ValidationError as exc:
            raise SystemExit(f"invalid setting: {_explain(exc)}") from exc


def env_name(name: str, info: FieldInfo) -> str:
    """The environment variable a field is read from."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    return alias if isinstance(alias, str) else f"{ENV_PREFIX}{name.upper()}"


def _explain(exc: ValidationError) -> str:
    model = Limits if exc.title == Limits.__name__ else Settings
    fields = model.model_fields
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = env_name(name, fields[name]) if name in fields else name
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


_DOC_HEAD = """# Settings

Generated from `flow_nexus_server/config.py` by `flow-nexus-server settings --markdown > docs/settings.md`;
tests/test_settings.py checks that it is current.

The server reads these environment variables once, at start-up. An empty variable counts as unset.
`flow-nexus-server settings` prints the values in effect.
"""
_DOC_NODES = """
Read by the nodes (they inherit the server's environment; the launchers pass the rest on their command line):
"""
_TABLE_HEAD = "| Variable | Type | Default | Meaning |\n| --- | --- | --- | --- |"


def settings_markdown() -> str:
    """docs/settings.md: one row per environment variable, from the models above."""
    from workers.protocol import TOKEN_ENV
    from workers.telemetry import DEFAULT_GRACE_S, GRACE_ENV

    server = [f"| `{env_name(name, info)}` | {_type_name(info)} | {_default_text(info)} | {info.description} |"
              for _model, name, info in _documented()]
    grace = "Seconds a node without a job waits for an unreachable controller before it stops itself"
    nodes = [f"| `{GRACE_ENV}` | float | `{DEFAULT_GRACE_S:g}` | {grace} |",
             f"| `{TOKEN_ENV}` | secret | | The cluster token, set by the launcher; never on a command line |"]
    return "\n".join([_DOC_HEAD, _TABLE_HEAD, *server, _DOC_NODES, _TABLE_HEAD, *nodes, ""])


def settings_lines(settings: Settings) -> list[str]:
    """NAME=value for every setting in effect; the token shows as set or unset."""
    lines = []
    for model, name, info in _documented():
        value = getattr(settings.limits if model is Limits else settings, name)
        if name == "token":
            value = "set" if value else "unset"
        elif isinstance(value, tuple):
            value = os.pathsep.join(map(str, value))
        lines.append(f"{env_name(name, info)}={value}")
    return lines


def _documented() -> Iterator[tuple[type[BaseSettings], str, FieldInfo]]:
    """(model, field name, field) of every setting read from one variable."""
    for model in (Settings, Limits):
        for name, info in model.model_fields.items():
            if name != "limits":
                yield model, name, info


def _type_name(info: FieldInfo) -> str:
    names = {int: "integer", float: "float", str: "string", bool: "boolean", Path: "path",
             SecretStr | None: "secret", tuple[Path, ...]: "paths"}
    kind = info.annotation
    if get_origin(kind) is Literal:
        return " \\| ".join(f"`{v}`" for v in get_args(kind))
    return names[kind]


def _default_text(info: FieldInfo) -> str:
    if info.default in ("", (), None):
        return ""
    return f"`{info.default}`"
