"""The MCP layer: publishes the service as tools. Thin: validate, call, return a typed reply."""

from __future__ import annotations

import base64
import functools
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from flow_nexus_server import __version__
from flow_nexus_server import completions, log_level, prompts
from flow_nexus_server import replies as r
from flow_nexus_server.config import MAX_DATASET_CHARS, MAX_UPLOAD_CHARS, Settings
from flow_nexus_server.controller.core import Controller
from flow_nexus_server.output_schemas import flatten_output_schemas
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.launchers import LaunchError
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.service import plots, templates
from flow_nexus_server.service.inference import InferenceService
from flow_nexus_server.service.training import Quantization, TrainingService, TrainRequest
from workers import protocol as p
from mcp.server.mcpserver import Context

log = logging.getLogger(__name__)
T = TypeVar("T")

ClusterId = Annotated[str, Field(min_length=1, max_length=64, description="Cluster id from neural_cluster_init (dnc_...)")]
NodeId = Annotated[str, Field(min_length=1, max_length=64, description="Node id from neural_node_deploy (node_...)")]
TopologyT = Literal["mesh", "ring", "star", "hierarchical"]
RoleT = Literal["worker", "parameter_server", "aggregator", "validator"]

INSTRUCTIONS = """\
Real distributed PyTorch training. Typical flow: neural_cluster_init -> neural_node_deploy
(count=N) -> neural_cluster_connect -> neural_cluster_status -> neural_cluster_terminate.
Every figure these tools report was measured on the running node processes."""

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
RECONFIGURES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking service call on a worker thread; service errors become ToolErrors, and so
    does anything unexpected: logged with its traceback, answered with a sentence naming the tool
    (the SDK's own answer would be a bare "Error executing tool X")."""
    tool = sys._getframe(1).f_code.co_name  # the tool function awaiting this call
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    except (ServiceError, NodeRequestError, LaunchError) as exc:
        raise ToolError(str(exc)) from exc
    except Exception as exc:
        log.exception("unexpected error in %s", tool)
        raise ToolError(f"internal error in {tool}: {type(exc).__name__}; see server.log in the server's state home "
                        "for the details") from exc


def call_in_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a memory-only service read on the event loop: on a busy CPU the hop to a worker thread
    and back costs more than the read itself. Errors map as in ``call``."""
    try:
        return fn(*args, **kwargs)
    except (ServiceError, NodeRequestError, LaunchError) as exc:
        raise ToolError(str(exc)) from exc
    except Exception as exc:
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        raise ToolError(f"internal error in {getattr(fn, '__name__', fn)}: {type(exc).__name__}; see server.log "
                        "in the server's state home for the details") from exc


def build_server(settings: Settings | None = None, service: ClusterService | None = None, *,
                 controller: Controller | None = None, token_verifier: Any = None, auth: Any = None) -> MCPServer:
    """One factory for the controller process, stdio, HTTP and the in-memory test client.

    With ``controller`` (the controller process) every connection shares its running services;
    without one, the server's lifespan starts a ``Controller`` and closes it, stopping its nodes,
    when the client leaves (in-process use)."""
    bus = controller.bus if controller is not None else InMemorySubscriptionBus()
    holder: dict[str, Controller | None] = {"ctrl": controller}

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        if controller is not None:  # entered once per connection: the controller's services outlive it
            yield None
            return
        own = Controller(settings or Settings.from_env(), clusters=service, bus=bus)
        holder["ctrl"] = own
        await own.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(own.publish_event_updates)
                yield None
                tg.cancel_scope.cancel()
        finally:
            await own.aclose(stop_nodes=True)

    def ctrl() -> Controller:
        c = holder["ctrl"]
        assert c is not None, "the server's lifespan has not started"
        return c

    def svc() -> ClusterService:
        return ctrl().clusters

    def training() -> TrainingService:
        return ctrl().training

    def inference() -> InferenceService:
        return ctrl().inference

    mcp = MCPServer("flow-nexus-server", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan,
                    token_verifier=token_verifier, auth=auth, subscriptions=bus)

    @mcp.tool(title="Create a cluster", annotations=CREATES)
    async def neural_cluster_init(
        name: Annotated[str, Field(min_length=1, max_length=200, description="Cluster name")],
        topology: Annotated[TopologyT, Field(description="How nodes exchange gradients/models")] = "mesh",
        architecture: Annotated[
            Literal["transformer", "cnn", "rnn", "mlp", "gnn", "hybrid"],
            Field(description="Model family trained on this cluster"),
        ] = "transformer",
        wasmOptimization: Annotated[bool, Field(description="Accepted for Flow Nexus compatibility; stored, changes nothing")] = True,
        daaEnabled: Annotated[bool, Field(description="Accepted for Flow Nexus compatibility; stored, changes nothing")] = True,
        consensus: Annotated[
            Literal["proof-of-learning", "byzantine", "raft", "gossip"],
            Field(description="How updates are agreed on (see docs)"),
        ] = "proof-of-learning",
        launcher: Annotated[Literal["subprocess", "docker", "ray"], Field(description="Where node processes run")] = "subprocess",
        backend: Annotated[Literal["auto", "gloo", "nccl"], Field(description="torch.distributed backend; auto = nccl when every node sees a GPU, else gloo")] = "auto",
        max_nodes: Annotated[int, Field(ge=1, le=64, description="Most nodes this cluster may hold")] = 8,
        auto_healing: Annotated[bool, Field(description="Replace failed nodes and resume from the last checkpoint")] = False,
        replication_factor: Annotated[int, Field(ge=1, le=8, description="Accepted for compatibility; stored")] = 1,
        idle_timeout_min: Annotated[float, Field(ge=0, le=10_080, description=(
            "Stop the cluster by itself after this many minutes with no training session running and no "
            "MCP client attached to the server (0 = never)"))] = 30,
    ) -> r.ClusterInitReply:
        """Create a cluster record and its directory. No process starts until neural_node_deploy."""
        return await call(
            svc().init_cluster, name=name, topology=topology, architecture=architecture, consensus=consensus,
            launcher=launcher, backend=backend, max_nodes=max_nodes, auto_healing=auto_healing,
            wasm_optimization=wasmOptimization, daa_enabled=daaEnabled,
            extra={"replication_factor": replication_factor, "idle_timeout_min": idle_timeout_min},
        )

    @mcp.tool(title="Deploy nodes", annotations=CREATES)
    async def neural_node_deploy(
        cluster_id: ClusterId,
        node_type: Annotated[RoleT, Field(description="Role of the node (alias of `role`)")] = "worker",
        role: Annotated[RoleT | None, Field(description="Role of the node; wins over node_type")] = None,
        template: Annotated[str, Field(max_length=100, description="Accepted for compatibility; stored")] = "nodejs",
        model: Annotated[Literal["base", "large", "xl", "custom"], Field(description="Model size preset; custom uses `layers`")] = "base",
        capabilities: Annotated[
            list[Literal["training", "inference"]], Field(max_length=2, description="What the node takes part in")
        ] = ["training", "inference"],  # noqa: B006 - pydantic copies defaults
        autonomy: Annotated[float, Field(ge=0, le=1, description="Accepted for compatibility; stored as given")] = 0.8,
        layers: Annotated[
            list[p.LayerSpec] | None,
            Field(max_length=64, description="Layer specs for model 'custom', e.g. {type: embedding, embedding_dim: 64}"),
        ] = None,
        count: Annotated[int, Field(ge=1, le=16, description="How many identical nodes to deploy")] = 1,
        behavior: Annotated[Literal["honest", "gaussian_noise", "sign_flip", "scaled", "nan"], Field(description=(
            "ADVERSARY SIMULATION for robustness testing: a dishonest node sends corrupted updates while claiming "
            "its normal sample count"))] = "honest",
        behavior_scale: Annotated[float, Field(ge=0, le=1e6, description="Noise scale (gaussian_noise) or factor (scaled)")] = 1.0,
        memory_mb: Annotated[int | None, Field(ge=64, le=16_777_216, description=(
            "Memory each node's training may use besides the node's runtime (default FLOW_NEXUS_NODE_MEMORY_MB, "
            "400): the deploy is refused when the host lacks it, a session whose model needs more is refused, "
            "and a node whose resident memory passes 1.5 x memory_mb + 512 MB (+2 GB on a GPU node) is stopped"))] = None,
        num_cpus: Annotated[float, Field(gt=0, le=256, description=(
            "CPUs each node reserves: its Ray placement-group bundle (launcher ray), docker run --cpus (launcher docker)"))] = 1.0,
        num_gpus: Annotated[float, Field(ge=0, le=16, description=(
            "GPUs each node reserves (launcher ray: Ray sets CUDA_VISIBLE_DEVICES; launcher docker: docker run --gpus); "
            "launcher subprocess refuses it on a machine without GPUs"))] = 0.0,
    ) -> r.DeployReply:
        """Start node processes; returns once each answers its health check (or with each failure's text)."""
        if model == "custom" and not layers:
            raise ToolError("model 'custom' needs a `layers` list, e.g. [{\"type\": \"dense\", \"units\": 64}, {\"type\": \"output\"}]")
        return await call(
            svc().deploy_nodes, cluster_id, role=role or node_type, count=count, model=model,
            capabilities=list(dict.fromkeys(capabilities)), autonomy=autonomy, template=template,
            layers=[layer.model_dump(exclude_none=True) for layer in layers] if layers else None,
            memory_mb=memory_mb, num_cpus=num_cpus, num_gpus=num_gpus,
            options={"behavior": {"kind": behavior, "scale": behavior_scale}} if behavior != "honest" else None,
        )

    @mcp.tool(title="Form the process group", annotations=RECONFIGURES)
    async def neural_cluster_connect(
        cluster_id: ClusterId,
        topology: Annotated[TopologyT | None, Field(description="Override the cluster's topology")] = None,
    ) -> r.ConnectReply:
        """Join every node into a torch.distributed group (new generation) and measure each topology edge."""
        return await call(svc().connect, cluster_id, topology)

    @mcp.tool(title="Cluster status", annotations=READ_ONLY)
    async def neural_cluster_status(cluster_id: ClusterId) -> r.ClusterStatusReply:
        """Live state of every node (alive, pid, RSS, rank, heartbeat) merged with the store."""
        if svc().rows_cached(cluster_id):  # the usual case: nothing but memory to read
            return call_in_loop(training().cluster_status, cluster_id)
        return await call(training().cluster_status, cluster_id)

    @mcp.tool(title="List clusters", annotations=READ_ONLY)
    async def neural_cluster_list(
        include_terminated: Annotated[bool, Field(description="Also list terminated clusters")] = True,
    ) -> r.ClusterListReply:
        """Every cluster in the store with its live node count."""
        return await call(svc().list_clusters, include_terminated)

    @mcp.tool(title="Remove a node", annotations=DESTROYS)
    async def neural_node_remove(node_id: NodeId) -> r.NodeRemoveReply:
        """Stop one node and take it out of its cluster; a connected cluster re-forms its group."""
        return await call(svc().remove_node, node_id)

    @mcp.tool(title="Node log", annotations=READ_ONLY)
    async def neural_node_logs(
        node_id: NodeId,
        tail: Annotated[int, Field(ge=1, le=5000, description="Number of lines from the end")] = 100,
    ) -> r.NodeLogsReply:
        """The end of one node's log, to see why a node failed."""
        return await call(svc().node_logs, node_id, tail)

    @mcp.tool(title="Terminate a cluster", annotations=DESTROYS)
    async def neural_cluster_terminate(cluster_id: ClusterId) -> r.TerminateReply:
        """Stop every node (graceful, then forced) and verify each process is gone."""
        return await call(training().terminate_cluster, cluster_id)

    @mcp.tool(title="Train across the cluster", annotations=CREATES)
    async def neural_train_distributed(
        cluster_id: ClusterId,
        dataset: Annotated[str, Field(min_length=1, max_length=MAX_DATASET_CHARS, description=(
            "A built-in dataset (digits, mnist-5k, tweet-sentiment, tweet-polarity, bbc-news, bbc-news-lm), "
            "a CSV/JSONL/TXT path or glob (relative paths are read inside each node's sandbox, see "
            "neural_node_upload), or inline JSON {\"X\"|\"data\"|\"features\": [...], \"y\"|\"labels\"|\"targets\": [...]}"))],
        ctx: Context,
        epochs: Annotated[int, Field(ge=1, le=1000, description="Epochs (synchronous / parameter server)")] = 10,
        batch_size: Annotated[int, Field(ge=1, le=512, description="Examples per step per worker")] = 32,
        learning_rate: Annotated[float, Field(ge=1e-5, le=1, description="Optimizer learning rate")] = 0.001,
        optimizer: Literal["adam", "sgd", "rmsprop", "adagrad"] = "adam",
        federated: Annotated[bool, Field(description="FedAvg: workers train locally, the aggregator combines models")] = False,
        rounds: Annotated[int | None, Field(ge=1, le=1000, description="Federated rounds (default: epochs)")] = None,
        aggregation_rounds: Annotated[int | None, Field(ge=1, le=1000, description="Alias of rounds (Flow Nexus guides)")] = None,
        local_epochs: Annotated[int, Field(ge=1, le=100, description="Federated local epochs per round")] = 1,
        architecture: Annotated[Literal["transformer", "cnn", "rnn", "mlp", "gnn", "hybrid"] | None,
                                Field(description="Override the cluster's architecture")] = None,
        partition: Annotated[Literal["iid", "dirichlet"], Field(description="How training data is split across workers")] = "iid",
        alpha: Annotated[float, Field(gt=0, le=1000, description="Dirichlet concentration (smaller = more label skew)")] = 0.5,
        validation_split: Annotated[float, Field(ge=0, le=0.5, description="Held-out fraction evaluated every epoch/round")] = 0.2,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        grad_clip: Annotated[float | None, Field(gt=0, le=1e6, description="Clip the global gradient norm")] = None,
        gradient_accumulation: Annotated[int, Field(ge=1, le=64, description="Micro-batches per optimizer step")] = 1,
        mixed_precision: Annotated[bool, Field(description="bf16 autocast (CPU, and the GPU of synchronous training on nccl where it supports bf16)")] = False,
        gradient_compression: Annotated[float | None, Field(gt=0, le=1, description="Top-k ratio of gradient entries sent (error feedback keeps the rest)")] = None,
        gradient_checkpointing: Annotated[bool, Field(description="Recompute activations in backward to save memory")] = False,
        checkpoint_every: Annotated[int, Field(ge=0, le=1000, description="Epochs/rounds between checkpoints (0: only at the end)")] = 0,
        max_checkpoints: Annotated[int, Field(ge=1, le=100, description="Keep the last N checkpoints")] = 3,
        resume_from: Annotated[str | None, Field(max_length=4096, description="Checkpoint id or path to continue from")] = None,
        min_nodes_per_round: Annotated[int | None, Field(ge=1, le=64, description="Accepted for compatibility; stored")] = None,
        consensus: Annotated[Literal["proof-of-learning", "byzantine", "raft", "gossip"] | None, Field(description=(
            "Override the cluster's consensus for this session"))] = None,
        aggregation_rule: Annotated[Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum"], Field(description=(
            "Rule the aggregator (or the hub in synchronous byzantine mode) applies"))] = "fedavg",
        byzantine_f: Annotated[int, Field(ge=0, le=32, description="Assumed Byzantine nodes for Krum / Multi-Krum")] = 1,
        trim_beta: Annotated[float, Field(ge=0, lt=0.5, description="Trimmed mean: fraction cut on each side")] = 0.2,
        multi_krum_m: Annotated[int | None, Field(ge=1, le=64, description="Updates Multi-Krum averages (default n - f)")] = None,
        pol_tolerance: Annotated[float, Field(ge=0, le=1e9, description=(
            "Proof-of-learning: a round is rejected when validation loss rises by more than this fraction "
            "(a huge value turns the check off: plain FedAvg)"))] = 0.05,
        reputation_weighting: Annotated[bool, Field(description="Weight updates by each node's reputation")] = False,
        quantization: Annotated[Quantization | None, Field(description=(
            "{enabled, bits: 8, method: dynamic}: after training, nodes serve an int8 dynamically quantized copy"))] = None,
        wait: Annotated[bool, Field(description="Block (with progress notifications) until done or wait_timeout_s")] = False,
        wait_timeout_s: Annotated[float, Field(gt=0, le=3600, description="Longest wait when `wait` is set")] = 600,
    ) -> r.TrainStartReply:
        """Train a real model across the cluster's nodes: synchronous data parallel along the topology,
        parameter-server mode (when the cluster has parameter_server nodes), or federated (FedAvg).
        Returns a session id at once unless `wait` is set."""
        req = TrainRequest(
            dataset=dataset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
            federated=federated, rounds=rounds or aggregation_rounds, local_epochs=local_epochs,
            architecture=architecture, partition=partition, alpha=alpha, validation_split=validation_split, seed=seed,
            grad_clip=grad_clip, gradient_accumulation=gradient_accumulation, mixed_precision=mixed_precision,
            gradient_compression=gradient_compression, gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, max_checkpoints=max_checkpoints, resume_from=resume_from,
            quantization=quantization, consensus=consensus, aggregation_rule=aggregation_rule, byzantine_f=byzantine_f,
            trim_beta=trim_beta, multi_krum_m=multi_krum_m, pol_tolerance=pol_tolerance,
            reputation_weighting=reputation_weighting)
        reply = await call(training().start, cluster_id, req)
        if not wait:
            return reply
        deadline = anyio.current_time() + wait_timeout_s
        while anyio.current_time() < deadline:
            done = await anyio.to_thread.run_sync(training().wait, reply.session_id, 1.0)
            view = training().live_view(cluster_id)
            if view is not None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in view.metrics.items()
                                  if k in ("loss", "val_loss", "val_accuracy", "val_perplexity"))
                await ctx.report_progress(view.progress_pct, 100, f"{view.mode} {view.status}: epoch {view.epoch}/"
                                          f"{view.total_epochs}, step {view.step}/{view.total_steps} {shown}".strip())
            if done:
                break
        final = training().live_view(cluster_id)
        return reply.model_copy(update={"result": final, "status": final.status if final else reply.status})

    @mcp.tool(title="Predict with the cluster", annotations=READ_ONLY)
    async def neural_predict_distributed(
        cluster_id: ClusterId,
        input_data: Annotated[str, Field(min_length=1, max_length=4_000_000, description=(
            "JSON: one example or a batch in the model's input form (raw text for text models, feature vectors "
            "or images otherwise), optionally {\"inputs\": [...], \"labels\": [...]}; or a path to a "
            ".json/.jsonl/.csv/.txt file of examples; or plain text for a text model"))],
        aggregation: Annotated[Literal["mean", "majority", "weighted", "ensemble"] | None, Field(description=(
            "mean of class probabilities (default), majority vote, confidence-weighted vote, or ensemble "
            "(averaging, with each node's vote and confidence)"))] = None,
        mode: Annotated[Literal["replicate", "shard"], Field(description=(
            "replicate: every node answers every example; shard: the batch is split across nodes"))] = "replicate",
        model: Annotated[Literal["global", "local"], Field(description=(
            "global model, or each node's local pre-aggregation model (after federated training)"))] = "global",
        quantized: Annotated[bool | None, Field(description="Serve the int8 copy (default: the training's quantization setting)")] = None,
    ) -> r.PredictReply:
        """Every node with the inference capability runs the model it holds; the server combines the answers."""
        return await call(inference().predict, cluster_id, input_data, aggregation or "mean", mode, model, quantized)

    @mcp.tool(title="Benchmark a model", annotations=READ_ONLY)
    async def neural_performance_benchmark(
        model_id: Annotated[str, Field(min_length=1, max_length=64, description="A cluster id or a checkpoint id")],
        benchmark_type: Literal["inference", "throughput", "memory", "comprehensive"] = "comprehensive",
        input_data: Annotated[str, Field(max_length=4_000_000, description=(
            "Examples (with labels for accuracy) as for neural_predict_distributed; empty: the held-out split "
            "for node measurements (end-to-end latency needs examples)"))] = "",
        runs: Annotated[int, Field(ge=5, le=2000, description="Timed runs per latency figure")] = 50,
        quantized: Annotated[bool | None, Field(description="Also measure the int8 copy (memory, latency, accuracy change)")] = None,
    ) -> r.BenchmarkResult:
        """Measured latency p50/p95/p99, throughput, model size, peak RSS per node, all-reduce figures."""
        result = await call(inference().benchmark, model_id, benchmark_type, input_data or None, runs, quantized)
        if benchmark_type == "comprehensive" and not model_id.startswith("ckpt_"):
            result.collectives = [c.model_dump() for c in await call(svc().collective_benchmark, model_id)]
        return result

    @mcp.tool(title="Export a model", annotations=CREATES)
    async def neural_model_export(
        model_id: Annotated[str, Field(min_length=1, max_length=64, description="A cluster id or a checkpoint id")],
        format: Literal["safetensors", "torchscript"] = "safetensors",
        destination: Annotated[str | None, Field(max_length=4096, description=(
            "Directory under the state home or FLOW_NEXUS_DATA_ROOTS (default: <home>/exports/<id>-<time>)"))] = None,
    ) -> r.ExportReply:
        """Write weights, config, tokenizer/label map and a model card with the metrics it was trained to."""
        return await call(inference().export, model_id, format, destination)

    @mcp.tool(title="Load a model into a cluster", annotations=RECONFIGURES)
    async def neural_model_load(
        cluster_id: ClusterId,
        path: Annotated[str, Field(min_length=1, max_length=4096, description="An export directory, a checkpoint file, or a checkpoint id")],
    ) -> r.LoadReply:
        """Every inference node of the cluster loads the model; no training needed before predicting."""
        return await call(inference().load, cluster_id, path)

    @mcp.tool(title="List cluster templates", annotations=READ_ONLY)
    async def neural_list_templates(
        category: Annotated[Literal["timeseries", "classification", "regression", "nlp", "vision", "anomaly",
                                    "generative", "reinforcement", "custom"] | None,
                            Field(description="Only templates of this category")] = None,
        tier: Annotated[str | None, Field(max_length=32, description="Only templates of this tier (all are 'free')")] = None,
        search: Annotated[str | None, Field(max_length=200, description="Words that must all appear")] = None,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
    ) -> r.TemplateListReply:
        """Ready-made clusters (nodes, topology, training recipe) that neural_deploy_template builds in one call."""
        return templates.list_templates(category, tier, search, limit)

    @mcp.tool(title="Deploy a template", annotations=CREATES)
    async def neural_deploy_template(
        template_id: Annotated[str, Field(min_length=1, max_length=100, description="Id from neural_list_templates")],
        custom_config: Annotated[dict[str, Any] | None, Field(description=(
            "Overrides: name, topology, architecture, consensus, auto_healing, max_nodes, workers (count), "
            "train (true to start the template's training), training (neural_train_distributed arguments)"))] = None,
    ) -> r.TemplateDeployReply:
        """Build a whole ready cluster in one call: init, deploy every node, connect (and train if asked)."""
        return await call(templates.deploy_template, svc(), training(), template_id, custom_config)

    @mcp.tool(title="Training session status", annotations=READ_ONLY)
    async def neural_training_status(
        session_id: Annotated[str | None, Field(max_length=64, description="Session id from neural_train_distributed")] = None,
        job_id: Annotated[str | None, Field(max_length=64, description="Alias of session_id (Flow Nexus)")] = None,
    ) -> r.TrainingStatusReply:
        """One session, running or finished: progress, metric history, per-node stats, checkpoints."""
        sid = session_id or job_id
        if not sid:
            raise ToolError("give session_id (the id neural_train_distributed returned)")
        return await call(training().status, sid)

    @mcp.tool(title="Training curves", annotations=READ_ONLY)
    async def neural_training_plot(
        session_id: Annotated[str, Field(min_length=1, max_length=64, description="Session to plot")],
    ) -> Annotated[CallToolResult, r.PlotInfo]:
        """A PNG of loss and accuracy per epoch/round, with each worker's local loss."""
        status = await call(training().status, session_id)
        unit = "round" if status.config.get("mode") == "federated" else "epoch"
        png, epochs = await call(plots.training_plot_png, status.history,
                                 title=f"{session_id} ({status.config.get('mode')}, {status.status})", unit=unit)
        info = r.PlotInfo(session_id=session_id, epochs_plotted=epochs, bytes=len(png), series=sorted(status.history))
        return CallToolResult(
            content=[ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"),
                     TextContent(type="text", text=info.model_dump_json())],
            structured_content=info.model_dump(),
        )

    @mcp.tool(title="Session events", annotations=READ_ONLY)
    async def execution_stream_subscribe(
        deployment_id: Annotated[str, Field(min_length=1, max_length=64, description="The training session id")],
        cursor: Annotated[int, Field(ge=0, le=2**62, description="Last event id seen; 0 for all")] = 0,
        wait_s: Annotated[float, Field(ge=0, le=60, description="How long to wait for new events when there are none")] = 10,
        limit: Annotated[int, Field(ge=1, le=500)] = 100,
    ) -> r.EventStreamReply:
        """A session's events after `cursor` (epoch done, checkpoint saved, node lost...), waiting briefly for new ones."""
        row = await call(training().session, deployment_id)
        deadline = anyio.current_time() + wait_s
        while True:
            events = await call(svc().store.session_events, deployment_id, cursor, limit)
            status = (await call(training().session, deployment_id)).status
            if events or anyio.current_time() >= deadline or status != "running":
                break
            await anyio.sleep(0.25)
        return r.EventStreamReply(
            success=True, deployment_id=row.id, status=status,
            events=[r.EventInfo(id=e.id, time=e.time, kind=e.kind, message=e.message, node_id=e.node_id, data=e.data)
                    for e in events],
            cursor=events[-1].id if events else cursor, resource_uri=f"session://{row.id}/events")

    @mcp.resource("session://{session_id}/events", mime_type="application/json", name="session-events",
                  description="All events of a training session, oldest first")
    async def session_events(session_id: str) -> str:
        try:
            await call(training().session, session_id)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        events = await call(svc().store.session_events, session_id, 0, 10_000)
        return json.dumps([r.EventInfo(id=e.id, time=e.time, kind=e.kind, message=e.message, node_id=e.node_id,
                                       data=e.data).model_dump() for e in events])

    @mcp.tool(title="Stop training", annotations=DESTROYS)
    async def neural_training_stop(
        session_id: Annotated[str, Field(min_length=1, max_length=64, description="Session to stop")],
    ) -> r.TrainingStopReply:
        """Ask every node to stop the session at its next step; returns once it ended."""
        return await call(training().stop, session_id)

    @mcp.tool(title="Upload a file to one node", annotations=CREATES)
    async def neural_node_upload(
        node_id: NodeId,
        file_name: Annotated[str, Field(min_length=1, max_length=255, description=(
            "Relative name inside the node's sandbox, e.g. data/mine.csv (at most 255 bytes per path component)"))],
        content: Annotated[str, Field(max_length=MAX_UPLOAD_CHARS, description=(
            "File content (text, or base64 with encoding='base64'); at most FLOW_NEXUS_MAX_UPLOAD_BYTES "
            "(default 8 MiB) once decoded"))],
        encoding: Literal["text", "base64"] = "text",
    ) -> r.UploadReply:
        """Write a file into one node's sandbox, so only that node reads it (federated privacy).
        Train with dataset=<file_name> and each node reads the file of that name in its own sandbox."""
        return await call(svc().upload, node_id, file_name, content, encoding)

    prompts.register(mcp)
    completions.register(mcp, lambda: svc().store)
    log_level.register(mcp)
    flatten_output_schemas(mcp)
    return mcp
