"""Training tools: start a session across a cluster, follow it, plot it, stop it."""

from __future__ import annotations

import base64
from typing import Annotated

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.config import MAX_DATASET_CHARS
from flow_nexus_server.service import plots
from flow_nexus_server.service.training import Quantization, TrainRequest
from flow_nexus_server.tools.common import CREATES, DESTROYS, READ_ONLY, App, ClusterId, call
from workers.protocol import AggregationRule, Architecture, Consensus, Optimizer, Partition


def register(mcp: MCPServer, app: App) -> None:
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
        optimizer: Optimizer = "adam",
        federated: Annotated[bool, Field(description="FedAvg: workers train locally, the aggregator combines models")] = False,
        rounds: Annotated[int | None, Field(ge=1, le=1000, description="Federated rounds (default: epochs)")] = None,
        aggregation_rounds: Annotated[int | None, Field(ge=1, le=1000, description="Alias of rounds (Flow Nexus guides)")] = None,
        local_epochs: Annotated[int, Field(ge=1, le=100, description="Federated local epochs per round")] = 1,
        architecture: Annotated[Architecture | None,
                                Field(description="Override the cluster's architecture")] = None,
        partition: Annotated[Partition, Field(description="How training data is split across workers")] = "iid",
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
        consensus: Annotated[Consensus | None, Field(description=(
            "Override the cluster's consensus for this session"))] = None,
        aggregation_rule: Annotated[AggregationRule, Field(description=(
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
        reply = await call(app.training.start, cluster_id, req)
        if not wait:
            return reply
        deadline = anyio.current_time() + wait_timeout_s
        while anyio.current_time() < deadline:
            done = await anyio.to_thread.run_sync(app.training.wait, reply.session_id, 1.0)
            view = app.training.live_view(cluster_id)
            if view is not None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in view.metrics.items()
                                  if k in ("loss", "val_loss", "val_accuracy", "val_perplexity"))
                await ctx.report_progress(view.progress_pct, 100, f"{view.mode} {view.status}: epoch {view.epoch}/"
                                          f"{view.total_epochs}, step {view.step}/{view.total_steps} {shown}".strip())
            if done:
                break
        final = app.training.live_view(cluster_id)
        return reply.model_copy(update={"result": final, "status": final.status if final else reply.status})

    @mcp.tool(title="Training session status", annotations=READ_ONLY)
    async def neural_training_status(
        session_id: Annotated[str | None, Field(max_length=64, description="Session id from neural_train_distributed")] = None,
        job_id: Annotated[str | None, Field(max_length=64, description="Alias of session_id (Flow Nexus)")] = None,
    ) -> r.TrainingStatusReply:
        """One session, running or finished: progress, metric history, per-node stats, checkpoints."""
        sid = session_id or job_id
        if not sid:
            raise ToolError("give session_id (the id neural_train_distributed returned)")
        return await call(app.training.status, sid)

    @mcp.tool(title="Training curves", annotations=READ_ONLY)
    async def neural_training_plot(
        session_id: Annotated[str, Field(min_length=1, max_length=64, description="Session to plot")],
    ) -> Annotated[CallToolResult, r.PlotInfo]:
        """A PNG of loss and accuracy per epoch/round, with each worker's local loss."""
        status = await call(app.training.status, session_id)
        unit = "round" if status.config.get("mode") == "federated" else "epoch"
        png, epochs = await call(plots.training_plot_png, status.history,
                                 title=f"{session_id} ({status.config.get('mode')}, {status.status})", unit=unit)
        info = r.PlotInfo(session_id=session_id, epochs_plotted=epochs, bytes=len(png), series=sorted(status.history))
        return CallToolResult(
            content=[ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"),
                     TextContent(type="text", text=info.model_dump_json())],
            structured_content=info.model_dump(),
        )

    @mcp.tool(title="Stop training", annotations=DESTROYS)
    async def neural_training_stop(
        session_id: Annotated[str, Field(min_length=1, max_length=64, description="Session to stop")],
    ) -> r.TrainingStopReply:
        """Ask every node to stop the session at its next step; returns once it ended."""
        return await call(app.training.stop, session_id)
