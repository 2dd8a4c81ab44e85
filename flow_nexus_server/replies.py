"""Typed tool replies: each becomes a tool's outputSchema and structuredContent.

Field names keep the Flow Nexus reply keys; extra fields carry what we measured.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClusterInitReply(BaseModel):
    success: bool
    cluster_id: str
    name: str
    status: str = Field(description="'initializing' until nodes are deployed")
    topology: str
    architecture: str
    consensus: str
    launcher: str
    backend: str
    max_nodes: int
    auto_healing: bool
    wasm_enabled: bool = Field(description="Accepted for compatibility; changes nothing here")
    daa_enabled: bool = Field(description="Accepted for compatibility; changes nothing here")
    directory: str = Field(description="Cluster directory holding one sandbox per node")
    created_at: float
    next_step: str


class NodeInfo(BaseModel):
    node_id: str
    sandbox_id: str
    sandbox_path: str
    role: str
    status: str = Field(description="deployed (answered its health check) or failed")
    capabilities: list[str]
    model: str
    autonomy: float
    pid: int | None = None
    startup_s: float | None = Field(None, description="Measured launch-to-healthy time")
    error: str | None = None


class GroupChange(BaseModel):
    action: str = Field(description="'reformed' (new generation), 'needs_connect', or 'none'")
    generation: int
    message: str


class DeployReply(BaseModel):
    success: bool
    cluster_id: str
    node_id: str = Field(description="The first deployed node (see `nodes` for all)")
    sandbox_id: str
    role: str
    status: str
    capabilities: list[str]
    nodes: list[NodeInfo]
    cluster_status: str
    group: GroupChange


class Edge(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: int = Field(alias="from", description="Source rank")
    to: int = Field(description="Destination rank")
    from_node: str
    to_node: str
    status: str = Field(description="'active' once a measurement crossed the link")
    latency_ms: float = Field(description="Measured median round trip of a 4-byte send/recv")
    bandwidth_mbps: float = Field(description="Measured with a 1 MiB round trip, Mbit/s")


class NetworkHealth(BaseModel):
    avg_latency_ms: float | None
    max_latency_ms: float | None
    avg_bandwidth_mbps: float | None
    min_bandwidth_mbps: float | None


class RankInfo(BaseModel):
    node_id: str
    rank: int
    role: str


class ConnectReply(BaseModel):
    success: bool
    cluster_id: str
    topology: str
    backend: str
    generation: int
    connections: int = Field(description="Number of edges")
    nodes_connected: int
    ranks: list[RankInfo]
    edges: list[Edge]
    network_health: NetworkHealth
    join_ms_max: float = Field(description="Slowest node's measured init_process_group + barrier time")


class NodeStatus(BaseModel):
    node_id: str
    sandbox_id: str
    role: str
    status: str = Field(description="starting, running, failed, lost, removed or stopped")
    alive: bool = Field(description="Process exists and the control API answered just now")
    pid: int | None
    rss_mb: float | None = Field(None, description="Resident memory measured now")
    rank: int | None
    generation: int | None
    last_heartbeat: float | None = Field(None, description="Unix time of the last health answer")
    heartbeat_age_s: float | None
    connections: int = Field(description="Edges touching this node in the current topology")
    capabilities: list[str]
    error: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class Features(BaseModel):
    daa_enabled: bool
    wasm_enabled: bool
    nodes_deployed: int
    connections_active: int
    training_sessions: int


class Performance(BaseModel):
    latency_ms: float | None = Field(None, description="Average edge latency measured at the last connect")
    bandwidth_mbps: float | None = Field(None, description="Average edge bandwidth measured at the last connect")


class ClusterStatusReply(BaseModel):
    success: bool
    cluster_id: str
    name: str
    status: str
    topology: str
    architecture: str
    consensus: str
    launcher: str
    backend: str
    created_at: float
    uptime_s: float
    generation: int
    group_state: str = Field(description="'formed', 'needs_connect' or 'not_connected'")
    group_message: str
    nodes: list[NodeStatus]
    performance: Performance
    features: Features
    options: dict[str, Any] = Field(description="Stored options, echoed (compatibility parameters included)")


class ClusterSummary(BaseModel):
    cluster_id: str
    name: str
    status: str
    topology: str
    architecture: str
    nodes: int = Field(description="Live nodes (starting or running)")
    created_at: float


class ClusterListReply(BaseModel):
    success: bool
    clusters: list[ClusterSummary]
    count: int


class NodeRemoveReply(BaseModel):
    success: bool
    cluster_id: str
    node_id: str
    pid: int | None
    process_gone: bool = Field(description="Checked after stopping: the process no longer exists")
    cluster_status: str
    group: GroupChange


class NodeLogsReply(BaseModel):
    success: bool
    node_id: str
    status: str
    log_path: str
    lines: int
    log: str


class TerminatedNode(BaseModel):
    node_id: str
    pid: int | None
    process_gone: bool


class TerminateReply(BaseModel):
    success: bool = Field(description="True only when every node process is verifiably gone")
    cluster_id: str
    status: str
    nodes_terminated: int
    nodes: list[TerminatedNode]
    message: str
