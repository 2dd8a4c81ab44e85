"""Training tools: start a session across a cluster, follow it, plot it, stop it."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.service import plots
from flow_nexus_server.service.training import training_options
from flow_nexus_server.tools.common import (
    DESTROYS,
    READ_ONLY,
    RETRAINS,
    App,
    ClusterId,
    call,
    call_in_loop,
    model_fields_as_parameters,
    tool,
    training_started_hinted,
)
from workers import protocol as p


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Train across the cluster", annotations=RETRAINS, ignored={
        "min_nodes_per_round": "every training worker takes part in every round here (stored)",
    })
    @model_fields_as_parameters(p.TrainOptions)
    async def neural_train_distributed(
        cluster_id: ClusterId,
        ctx: Context,
        aggregation_rounds: Annotated[int | None, Field(ge=1, le=1000, description="Alias of rounds (Flow Nexus "
                                                                                   "guides)")] = None,
        min_nodes_per_round: Annotated[int | None, Field(ge=1, le=64, description="Accepted for compatibility; "
                                                                                  "stored, changes nothing")] = None,
        wait: Annotated[bool,
                        Field(description="Block (with progress notifications) until done or wait_timeout_s")] = False,
        wait_timeout_s: Annotated[float, Field(gt=0, le=3600, description="Longest wait when `wait` is set")] = 600,
        **options: Any,
    ) -> r.TrainStartReply:
        """Train a real model across the cluster's nodes: synchronous data parallel along the topology,
        parameter-server mode (when the cluster has parameter_server nodes), or federated (FedAvg).
        Returns a session id at once unless `wait` is set."""
        options["rounds"] = options["rounds"] or aggregation_rounds
        # the whole model again: its cross-field rules (compression vs ratio, ...) give a sentence here
        req = call_in_loop(training_options, options)
        reply = training_started_hinted(await call(app.training.start, cluster_id, req))
        if not wait:
            return reply
        steps = app.training.follow(reply.session_id, cluster_id, wait_timeout_s)
        while (view := await anyio.to_thread.run_sync(next, steps, None)) is not None:
            await ctx.report_progress(view.progress_pct, 100, progress_line(view))
        final = app.training.live_view(cluster_id)
        return reply.model_copy(update={"result": final, "status": final.status if final else reply.status})

    @tool(mcp, title="Training session status", annotations=READ_ONLY, sparse=True)
    async def neural_training_status(
        session_id: Annotated[str | None, Field(max_length=64, description="Session id from "
                                                                           "neural_train_distributed")] = None,
        job_id: Annotated[str | None, Field(max_length=64, description="Alias of session_id (Flow Nexus)")] = None,
    ) -> r.TrainingStatusReply:
        """One session, running or finished: progress, metric history, per-node stats, checkpoints.
        A figure not measured yet is left out of the reply (never sent as null)."""
        sid = session_id or job_id
        if not sid:
            raise ToolError("give session_id (the id neural_train_distributed returned)")
        return await call(app.training.status, sid)

    # Either id names the session: the input schema says one is required (a signature cannot), and the
    # SDK publishes a tool's parameters from this dict.
    status_schema = mcp._tool_manager.get_tool("neural_training_status").parameters
    status_schema["anyOf"] = [{"required": ["session_id"]}, {"required": ["job_id"]}]

    @tool(mcp, title="Training curves", annotations=READ_ONLY)
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

    @tool(mcp, title="Stop training", annotations=DESTROYS)
    async def neural_training_stop(
        session_id: Annotated[str, Field(min_length=1, max_length=64, description="Session to stop")],
    ) -> r.TrainingStopReply:
        """Ask every node to stop the session at its next step; returns once it ended."""
        return await call(app.training.stop, session_id)


def progress_line(view: r.TrainingLive) -> str:
    """One progress notification's text: where the session is and its headline metrics."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in view.metrics.items()
                      if k in ("loss", "val_loss", "val_accuracy", "val_perplexity"))
    return (f"{view.mode} {view.status}: epoch {view.epoch}/{view.total_epochs}, "
            f"step {view.step}/{view.total_steps} {shown}").strip()
