"""Typed tool replies: each becomes a tool's outputSchema and structuredContent.

Field names keep the Flow Nexus reply keys; extra fields carry what we measured.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from flow_nexus_server.service.errors import NextStep
from flow_nexus_server.states import ClusterState, NodeState, SessionState


class ClusterInitReply(BaseModel):
    success: bool
    cluster_id: str
    name: str
    status: ClusterState = Field(description="'initializing' until nodes are deployed")
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
    status: Literal["deployed", "failed"] = Field(description="deployed (answered its health check) or failed")
    capabilities: list[str]
    model: str
    autonomy: float
    pid: int | None = None
    startup_s: float | None = Field(None, description="Measured launch-to-healthy time")
    error: str | None = None


class GroupChange(BaseModel):
    action: str = Field(description="'reformed' (new generation), 'at_next_boundary' (a running session takes "
                                    "the node in at its next epoch / round boundary), 'needs_connect', or 'none'")
    generation: int
    message: str
    # What to do next, named as a tool by the tool layer in `message`; not sent as a field.
    _next_step: NextStep | None = PrivateAttr(None)

    @classmethod
    def pending(cls, action: str, generation: int, message: str, next_step: NextStep | None) -> GroupChange:
        change = cls(action=action, generation=generation, message=message)
        change._next_step = next_step
        return change

    @property
    def next_step(self) -> NextStep | None:
        return self._next_step


class DeployReply(BaseModel):
    success: bool
    cluster_id: str
    node_id: str = Field(description="The first deployed node (see `nodes` for all)")
    sandbox_id: str
    role: str
    status: Literal["deployed", "failed"] = Field(description="The first deployed node's")
    capabilities: list[str]
    nodes: list[NodeInfo]
    cluster_status: ClusterState
    group: GroupChange


class Edge(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: int = Field(alias="from", description="Source rank")
    to: int = Field(description="Destination rank")
    from_node: str
    to_node: str
    status: Literal["active"] = Field(description="'active' once a measurement crossed the link")
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
    status: NodeState
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
    status: ClusterState
    topology: str
    architecture: str
    consensus: str
    launcher: str
    backend: str
    created_at: float
    uptime_s: float
    generation: int
    group_state: Literal["formed", "needs_connect", "not_connected"]
    group_message: str
    nodes: list[NodeStatus]
    performance: Performance
    features: Features
    options: dict[str, Any] = Field(description="Stored options, echoed (compatibility parameters included)")
    training: TrainingLive | None = Field(None, description="The running or most recent training session")
    training_progress: float | None = Field(None, description="Percent done of the current session")
    current_epoch: int | None = None
    current_loss: float | None = None
    global_accuracy: float | None = Field(None, description="Latest validation accuracy of the global model")


class ClusterSummary(BaseModel):
    cluster_id: str
    name: str
    status: ClusterState
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
    cluster_status: ClusterState
    group: GroupChange


class NodeLogsReply(BaseModel):
    success: bool
    node_id: str
    status: NodeState
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
    status: ClusterState
    nodes_terminated: int
    nodes: list[TerminatedNode]
    message: str
    final_metrics: dict[str, Any] | None = Field(None, description="Of the last training session")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint files kept on disk")


class TrainConfig(BaseModel):
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    federated: bool
    mode: str = Field(description="sync, parameter_server or federated")
    topology: str
    architecture: str
    model: str
    dataset: str
    rounds: int
    local_epochs: int
    extra: dict[str, Any] = Field(default_factory=dict, description="Every other option as applied")


class CheckpointInfo(BaseModel):
    checkpoint_id: str
    path: str
    epoch: int
    node_id: str
    created_at: float
    deleted: bool = Field(description="Removed to keep only the last max_checkpoints")


class TrainingLive(BaseModel):
    """What a running (or the last) session looks like right now."""

    session_id: str
    status: SessionState
    mode: str
    epoch: int = Field(description="Epoch (sync/PS) or round (federated) in progress or done")
    total_epochs: int
    step: int
    total_steps: int
    progress_pct: float
    elapsed_s: float
    eta_s: float | None = Field(None, description="Remaining time extrapolated from measured progress")
    metrics: dict[str, float] = Field(description="Latest global metrics from the reporting node")
    nodes: dict[str, dict[str, float]] | None = Field(None, description=(
        "Per-node measured stats, by node id (in neural_cluster_status they are in each node's `metrics`)"))
    checkpoints: list[str]
    error: str | None = None
    restarts: int = Field(0, description="Times auto_healing replaced a lost node and resumed")
    consensus: dict[str, float] = Field(default_factory=dict, description=(
        "rejected_rounds, rejected_updates, excluded_updates (worker updates proof-of-learning left out), raft_term, "
        "raft_commit_index, model_spread when the mode reports them"))
    reputation: dict[str, float] = Field(default_factory=dict, description="node_id -> reputation in [0, 1]")


class TrainStartReply(BaseModel):
    success: bool
    session_id: str
    cluster_id: str
    status: SessionState
    nodes_training: int
    roles: dict[str, str] = Field(description="node_id -> role in this session")
    config: TrainConfig
    data: dict[str, Any] = Field(description="What the nodes found: kind, examples, classes")
    result: TrainingLive | None = Field(None, description="Final state when `wait` was set")
    message: str


class TrainingStatusReply(BaseModel):
    success: bool
    session_id: str
    cluster_id: str
    status: SessionState
    config: dict[str, Any]
    created_at: float
    finished_at: float | None
    live: TrainingLive | None = Field(None, description="Progress while running, final figures after")
    final_metrics: dict[str, Any] | None
    history: dict[str, list[list[float]]] = Field(description="metric -> [[epoch, step, value], ...]")
    checkpoints: list[CheckpointInfo]
    error: str | None


class TrainingStopReply(BaseModel):
    success: bool
    session_id: str
    status: SessionState
    message: str


class UploadReply(BaseModel):
    success: bool
    node_id: str
    path: str = Field(description="Where the file now lies inside the node's sandbox")
    relative_path: str = Field(description="Pass this as `dataset` to train on it")
    bytes: int


class TemplateInfo(BaseModel):
    id: str
    name: str
    category: str
    tier: str
    description: str
    tags: list[str]
    cluster: dict[str, Any]
    nodes: list[dict[str, Any]]
    training: dict[str, Any] | None = Field(None, description="The neural_train_distributed arguments it suggests")


class TemplateListReply(BaseModel):
    success: bool
    templates: list[TemplateInfo]
    count: int
    total_matching: int


class TemplateDeployReply(BaseModel):
    success: bool
    template_id: str
    cluster_id: str
    cluster: ClusterInitReply
    nodes: list[NodeInfo]
    connection: ConnectReply
    training: TrainStartReply | None = Field(None, description="Set when custom_config.train was true")
    suggested_training: dict[str, Any] | None = Field(None, description="Arguments for neural_train_distributed")


class EventInfo(BaseModel):
    id: int = Field(description="Pass the last id as `cursor` to get only newer events")
    time: float
    kind: str
    message: str
    node_id: str | None = None
    data: dict[str, Any] | None = None


class EventStreamReply(BaseModel):
    success: bool
    deployment_id: str
    status: SessionState = Field(description="The session's status when the reply was made")
    events: list[EventInfo]
    cursor: int = Field(description="The id to pass next time")
    resource_uri: str = Field(description="The same events as an MCP resource")


class PlotInfo(BaseModel):
    session_id: str
    epochs_plotted: int
    bytes: int
    series: list[str]
    mime_type: str = "image/png"


class ClassificationMetrics(BaseModel):
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    support: int
    label_names: list[str]
    confusion_matrix: list[list[int]] = Field(description="Rows: true class, columns: predicted class")
    per_class: list[dict[str, Any]]


class NodePrediction(BaseModel):
    node_id: str
    prediction: str | list[str] | None = Field(description="Label name(s) this node voted for")
    confidence: float = Field(description="Mean of this node's top-class probability")
    latency_ms: float = Field(description="Measured on the node")
    round_trip_ms: float = Field(description="Measured by the server around the call")
    model: str = Field(description="global, local or int8")
    examples: int


class PredictReply(BaseModel):
    success: bool
    cluster_id: str
    prediction: str | list[str] = Field(description="Label name (one example) or names (a batch)")
    confidence: float = Field(description="Consensus confidence (mean over examples)")
    aggregation_method: str
    mode: str = Field(description="replicate (every node answers every example) or shard")
    model: str
    nodes_used: int
    examples: int
    individual_predictions: list[NodePrediction]
    details: list[dict[str, Any]] = Field(description="Per example: label, confidence, agreement, distribution")
    details_truncated: bool
    total_latency_ms: float = Field(description="Measured by the server: first request out to last answer in")
    metrics: ClassificationMetrics | None = Field(None, description="When the input carried labels")


class LatencyStats(BaseModel):
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    nodes: int


class BenchmarkResult(BaseModel):
    success: bool
    model_id: str
    benchmark_type: str
    results: dict[str, Any] = Field(description="latency_p50/p95/p99 (ms), samples_per_second, model_size_mb, "
                                                "peak_memory_mb, ... all measured")
    nodes: list[dict[str, Any]] = Field(default_factory=list, description="Each node's own measurements")
    end_to_end: LatencyStats | None = Field(None, description="Single-example predictions through all nodes, "
                                                              "timed by the server")
    collectives: list[dict[str, Any]] = Field(default_factory=list, description="All-reduce time and bandwidth "
                                                                                "per topology and size")
    timestamp: float


class ExportReply(BaseModel):
    success: bool
    model_id: str
    format: str
    directory: str
    files: list[str]
    bytes: int


class LoadReply(BaseModel):
    success: bool
    cluster_id: str
    source: str
    nodes_loaded: int
    model: dict[str, Any]


class CollectiveFigure(BaseModel):
    topology: str
    bytes: int
    time_ms: float = Field(description="Slowest rank's median all-reduce time")
    algbw_mbps: float = Field(description="bytes x 8 / time, Mbit/s")
    world_size: int
