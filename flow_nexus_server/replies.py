"""Typed tool replies: each becomes a tool's outputSchema and structuredContent.

Field names keep the Flow Nexus reply keys; extra fields carry what we measured.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from flow_nexus_server.service.errors import NextStep
from flow_nexus_server.states import ClusterState, NodeState, SessionState


class ToolReply(BaseModel):
    """What every tool reply carries besides its own fields: the arguments that changed nothing."""

    ignored: dict[str, str] = Field(default_factory=dict, description=(
        "Arguments accepted for Flow Nexus compatibility that change nothing here, each with the reason"))
    unknown: list[str] = Field(default_factory=list, description=(
        "Arguments this tool does not know; they were not used"))


class ClusterInitReply(ToolReply):
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
                                    "the node in, or lets it go, at its next epoch / round boundary), "
                                    "'needs_connect', or 'none'")
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


class DeployReply(ToolReply):
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


class ConnectReply(ToolReply):
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
    pid: int | None = None
    host: str | None = Field(None, description="Address of the node's control API: 127.0.0.1 on the server's "
                             "host, that host's address for a node on another machine (launcher ray)")
    rss_mb: float | None = Field(None, description="Resident memory measured now")
    rank: int | None = None
    generation: int | None = None
    last_heartbeat: float | None = Field(None, description="Unix time of the last health answer")
    heartbeat_age_s: float | None = None
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


class WorkerStats(BaseModel):
    node_id: str
    samples_processed: float | None = Field(None, description="Examples this worker trained on in the session")
    avg_step_time_ms: float | None = Field(None, description="Measured mean optimizer-step time")
    local_loss: float | None = Field(None, description="Its training loss over its last epoch / round")
    memory_mb: float | None = Field(None, description="Its resident memory, measured by the node")


class ParameterServerStats(BaseModel):
    node_id: str
    gradient_updates: float | None = Field(None, description=(
        "Updates it applied to its shard: optimizer steps (parameter-server training) or committed aggregates "
        "(federated)"))
    sync_latency_ms: float | None = Field(None, description=(
        "Measured mean time of one exchange: from the workers' gradients to its fresh weights (parameter-server "
        "training), or receiving, applying and serving a round's aggregate (federated)"))
    memory_mb: float | None = None


class AggregatorStats(BaseModel):
    node_id: str
    checkpoints_created: float | None = None
    consensus_rounds: float | None = Field(None, description="Rounds (or epochs) it aggregated and put to the "
                                                            "commit rule")
    rejected_rounds: float | None = None
    avg_consensus_ms: float | None = Field(None, description="Measured mean time of one aggregation + commit")
    memory_mb: float | None = None


class Throughput(BaseModel):
    samples_per_s: float | None = Field(None, description="Training examples per second over the last epoch")
    tokens_per_s: float | None = Field(None, description="Training tokens per second (text and language models)")


class SessionSummary(BaseModel):
    """A training session as the Flow Nexus guides read it (every figure measured)."""

    session_id: str
    status: SessionState
    mode: str
    epoch: int
    total_epochs: int
    metrics: dict[str, float | None] = Field(description=(
        "global_loss, global_accuracy, validation_accuracy, validation_loss, perplexity, convergence_rate"))
    workers: list[WorkerStats]
    time_elapsed_s: float
    estimated_completion: str | None = Field(None, description="UTC time the session should end (ISO 8601), "
                                                               "extrapolated from measured progress")


class ClusterStatusReply(ToolReply):
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
    training_sessions: list[SessionSummary] = Field(default_factory=list, description=(
        "The current (or last) session in the guides' shape"))
    worker_stats: list[WorkerStats] = Field(default_factory=list)
    parameter_server_stats: list[ParameterServerStats] = Field(default_factory=list)
    aggregator_stats: list[AggregatorStats] = Field(default_factory=list)
    convergence_rate: float | None = Field(None, description=(
        "Mean relative fall of the validation loss (else training loss) per epoch / round over the last five"))
    estimated_completion: str | None = Field(None, description="UTC time the session should end (ISO 8601)")
    throughput: Throughput | None = None


class ClusterSummary(BaseModel):
    cluster_id: str
    name: str
    status: ClusterState
    topology: str
    architecture: str
    nodes: int = Field(description="Live nodes (starting or running)")
    created_at: float


class ClusterListReply(ToolReply):
    success: bool
    clusters: list[ClusterSummary]
    count: int


class NodeRemoveReply(ToolReply):
    success: bool
    cluster_id: str
    node_id: str
    pid: int | None
    process_gone: bool = Field(description="Checked after stopping: the process no longer exists (false while "
                                           "a running session still holds the node: it is stopped at the "
                                           "session's next epoch / round boundary)")
    cluster_status: ClusterState
    group: GroupChange


class NodeLogsReply(ToolReply):
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


class Artifacts(BaseModel):
    final_model: str | None = Field(None, description="Directory of the final model's export (pytorch format), "
                                                      "None when no node held a model")
    final_model_files: list[str] = Field(default_factory=list)
    checkpoints: list[str] = Field(default_factory=list)
    logs: list[str] = Field(default_factory=list, description="Each node's log file")


class TerminateReply(ToolReply):
    success: bool = Field(description="True only when every node process is verifiably gone")
    cluster_id: str
    status: ClusterState
    nodes_terminated: int
    nodes: list[TerminatedNode]
    message: str
    final_metrics: dict[str, Any] | None = Field(None, description=(
        "Of the last training session: its final metrics plus total_epochs, total_steps, samples_processed, "
        "final_loss, final_perplexity (language models), training_time_s"))
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint files kept on disk")
    checkpoints_saved: int = Field(0, description="Checkpoint files kept on disk (count)")
    artifacts: Artifacts | None = Field(None, description="Real paths: final model export, checkpoints, logs")


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


class DistributedConfig(BaseModel):
    """Who takes part in a session and how they synchronise (the guides' ``distributed_config``)."""

    workers: int = Field(description="Workers that train")
    parameter_servers: int = Field(description="Parameter servers holding shards of the model in this session")
    aggregators: int = Field(description="Aggregator nodes taking part")
    validators: int = Field(0, description="Validator nodes taking part")
    strategy: str = Field(description="How updates are combined")
    sync_frequency: str = Field(description="When the nodes synchronise")


class TrainStartReply(ToolReply):
    success: bool
    session_id: str
    cluster_id: str
    status: SessionState
    nodes_training: int
    roles: dict[str, str] = Field(description="node_id -> role in this session")
    distributed_config: DistributedConfig | None = None
    config: TrainConfig
    data: dict[str, Any] = Field(description="What the nodes found: kind, examples, classes")
    result: TrainingLive | None = Field(None, description="Final state when `wait` was set")
    message: str


class TrainingStatusReply(ToolReply):
    success: bool
    session_id: str
    cluster_id: str
    status: SessionState
    config: dict[str, Any]
    created_at: float
    finished_at: float | None = None
    live: TrainingLive | None = Field(None, description="Progress while running, final figures after")
    final_metrics: dict[str, Any] | None = None
    history: dict[str, list[list[float]]] = Field(description="metric -> [[epoch, step, value], ...]")
    checkpoints: list[CheckpointInfo]
    error: str | None = None


class TrainingStopReply(ToolReply):
    success: bool
    session_id: str
    status: SessionState
    message: str


class UploadReply(ToolReply):
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


class TemplateListReply(ToolReply):
    success: bool
    templates: list[TemplateInfo]
    count: int
    total_matching: int


class TemplateDeployReply(ToolReply):
    success: bool
    template_id: str
    cluster_id: str
    cluster: ClusterInitReply
    nodes: list[NodeInfo]
    connection: ConnectReply
    training: TrainStartReply | None = Field(None, description="Set when custom_config.train was true")
    suggested_training: dict[str, Any] | None = Field(None, description="Arguments for neural_train_distributed")
    model_size: dict[str, Any] | None = Field(None, description=(
        "custom_config.model_size as built: asked_parameters, the nearest preset and its parameters, a message"))


class EventInfo(BaseModel):
    id: int = Field(description="Pass the last id as `cursor` to get only newer events")
    time: float
    kind: str
    message: str
    node_id: str | None = None
    data: dict[str, Any] | None = None


class EventStreamReply(ToolReply):
    success: bool
    deployment_id: str
    status: SessionState = Field(description="The session's status when the reply was made")
    events: list[EventInfo]
    cursor: int = Field(description="The id to pass next time")
    resource_uri: str = Field(description="The same events as an MCP resource")


class PlotInfo(ToolReply):
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
    precision: float = Field(description="The guides' name for macro_precision")
    recall: float = Field(description="The guides' name for macro_recall")
    f1_score: float = Field(description="The guides' name for macro_f1")
    support: int
    label_names: list[str]
    confusion_matrix: list[list[int]] = Field(description="Rows: true class, columns: predicted class")
    per_class: list[dict[str, Any]]


class NodePrediction(BaseModel):
    node_id: str
    prediction: str | list[str] | None = Field(description=(
        "Label name(s) this node voted for; a language model: its own continuation(s) (None in ensemble "
        "decoding, where the nodes write one text together)"))
    confidence: float = Field(description=(
        "Mean of this node's top-class probability; a language model: the mean log-probability of its tokens "
        "(ensemble: of the joint text's tokens under this node's model)"))
    latency_ms: float = Field(description="Measured on the node (ensemble: the sum of its decoding steps)")
    round_trip_ms: float = Field(description="Measured by the server around the call")
    model: str = Field(description="global, local or int8")
    examples: int
    new_tokens: int | None = Field(None, description="A language model: tokens generated")
    tokens_per_second: float | None = Field(None, description="A language model: new tokens / node latency")
    first_token_ms: float | None = Field(None, description="A language model: time to first token (median)")


class PredictReply(ToolReply):
    success: bool
    cluster_id: str
    prediction: str | list[str] = Field(description=(
        "Label name (one example) or names (a batch); a language model: the continuation(s)"))
    confidence: float = Field(description=(
        "Consensus confidence (mean over examples); a language model: mean token log-probability"))
    aggregation_method: str
    mode: str = Field(description="replicate (every node answers every example) or shard")
    model: str
    nodes_used: int
    examples: int
    individual_predictions: list[NodePrediction]
    details: list[dict[str, Any]] = Field(description=(
        "Per example: label, confidence, agreement, distribution; a language model: prompt, continuation, "
        "token_ids, mean_logprob, stopped, new_tokens, tokens_per_second, first_token_ms and each node's part"))
    details_truncated: bool
    total_latency_ms: float = Field(description="Measured by the server: first request out to last answer in")
    metrics: ClassificationMetrics | None = Field(None, description="When the input carried labels")
    generation: dict[str, Any] | None = Field(None, description="A language model: the generation options used")
    release: str | None = Field(None, description=(
        "The registry release the cluster serves (NAME@VERSION, loaded as registry:NAME@...); none for a model "
        "trained or loaded otherwise"))


class LatencyStats(BaseModel):
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    nodes: int


class BenchmarkResult(ToolReply):
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


class ExportReply(ToolReply):
    success: bool
    model_id: str
    format: str
    directory: str
    files: list[str]
    bytes: int


class LoadReply(ToolReply):
    success: bool
    cluster_id: str
    source: str
    nodes_loaded: int
    model: dict[str, Any]
    release: str | None = Field(None, description="NAME@VERSION when a registry release was loaded")


class CollectiveFigure(BaseModel):
    topology: str
    op: str = Field("all_reduce", description="all_reduce (averaging), all_gather or broadcast")
    bytes: int
    time_ms: float = Field(description="Slowest rank's median time of the collective")
    algbw_mbps: float = Field(description="bytes x 8 / time, Mbit/s")
    world_size: int


# ------------------------------------------------------------------ model registry
class GateResult(BaseModel):
    name: Literal["quality", "latency", "compatibility", "safety"]
    passed: bool
    value: float | str | None = Field(description="The candidate's figure (None: not measured)")
    threshold: float | str | None = Field(description="What it had to reach: from stable, or a floor")
    detail: str


class ReleaseInfo(BaseModel):
    name: str
    version: str
    kind: Literal["model", "ensemble", "distilled"]
    aliases: list[str] = Field(description="stable and/or previous when they point at this version")
    directory: str = Field(description="The release folder: artifacts and manifest.json")
    created_at: float
    promoted_at: float | None = None
    rolled_back_at: float | None = None
    gates: list[GateResult] | None = Field(None, description="The last promotion attempt's gates")
    evaluations: dict[str, dict[str, Any]] = Field(description="Canonical evaluation reports by dataset")
    parents: list[dict[str, Any]] | None = Field(None, description="An ensemble's parent releases")
    manifest: dict[str, Any] | None = Field(None, description="The immutable manifest (neural_model_get)")


class RegisterReply(ToolReply):
    success: bool
    name: str
    version: str = Field(description="Semantic version: minor bump, major when the input/label/tokenizer contract "
                                     "changed")
    directory: str
    manifest: dict[str, Any] = Field(description=(
        "files with sha256 and bytes, contract, model_card, training_config, dataset_fingerprint, metrics, provenance"))


class ModelListReply(ToolReply):
    success: bool
    releases: list[ReleaseInfo]


class ModelGetReply(ToolReply):
    success: bool
    release: ReleaseInfo


class EvaluateReply(ToolReply):
    success: bool
    name: str
    version: str
    report: dict[str, Any] = Field(description=(
        "accuracy, macro_f1, latency_p50_ms / latency_p95_ms (through a serving cluster), size_mb, parameters, "
        "robustness (accuracy under the fixed perturbation), perturbation, nan_outputs, examples"))


class PromoteReply(ToolReply):
    success: bool
    promoted: bool
    gates: list[GateResult]
    stable: str | None = Field(description="The stable version after the call")
    message: str = Field(description="Promoted, or which gate refused it and why")


class RollbackReply(ToolReply):
    success: bool
    name: str
    stable: str
    previous: str | None
    rolled_back: str
    clusters_reloaded: list[str] = Field(description="Clusters serving NAME@stable that now serve the new stable")
    message: str
