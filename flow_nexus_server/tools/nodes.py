"""Node tools: deploy, remove, read a node's log, upload a file into one node's sandbox."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.config import MAX_UPLOAD_CHARS
from flow_nexus_server.tools.common import (
    CREATES,
    DESTROYS,
    READ_ONLY,
    REPLACES,
    App,
    ClusterId,
    NodeId,
    call,
    group_change_hinted,
    tool,
)
from workers import protocol as p
from workers.protocol import BehaviorKind, Capability, ModelPreset, Role


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Deploy nodes", annotations=CREATES, ignored={
        "template": "nodes are Python processes (launcher subprocess, docker or ray), not sandbox templates "
                    "(stored, shown)",
        "autonomy": "nodes act only on tool calls; there is no autonomous agent to tune (stored, shown)",
    })
    async def neural_node_deploy(
        cluster_id: ClusterId,
        node_type: Annotated[Role | None, Field(description="Role of the node (alias of `role`; default worker)")
                             ] = None,
        role: Annotated[Role | None, Field(description="Role of the node; wins over node_type")] = None,
        template: Annotated[str, Field(max_length=100, description="Accepted for compatibility; stored")] = "nodejs",
        model: Annotated[ModelPreset, Field(description="Model size preset; custom uses `layers`")] = "base",
        capabilities: Annotated[
            list[Capability], Field(max_length=32, description=(
                "What the node takes part in: free-form names, stored and shown. These act: training (a worker "
                "trains), inference (answers predictions), validation (holds the validation split and judges "
                "rounds), checkpoint_creation (writes the checkpoints), aggregation / gradient_aggregation (may "
                "aggregate); others are kept as labels"))
        ] = ["training", "inference"],  # noqa: B006 - pydantic copies defaults
        autonomy: Annotated[float, Field(ge=0, le=1, description="Accepted for compatibility; stored as given")] = 0.8,
        layers: Annotated[
            list[p.LayerSpec] | None,
            Field(max_length=64, description=(
                "Layer specs, e.g. {type: embedding, embedding_dim: 64}: a layer list on any node defines the "
                "cluster's model (whatever `model` says: it becomes 'custom')")),
        ] = None,
        count: Annotated[int, Field(ge=1, le=16, description="How many identical nodes to deploy")] = 1,
        behavior: Annotated[BehaviorKind, Field(description=(
            "ADVERSARY SIMULATION for robustness testing: a dishonest node sends corrupted updates while claiming "
            "its normal sample count"))] = "honest",
        behavior_scale: Annotated[float, Field(ge=0, le=1e6, description="Noise scale (gaussian_noise) or factor "
                                                                         "(scaled)")] = 1.0,
        memory_mb: Annotated[int | None, Field(ge=64, le=16_777_216, description=(
            "Memory each node's training may use besides the node's runtime (default FLOW_NEXUS_NODE_MEMORY_MB, "
            "400): the deploy is refused when the host lacks it, a session whose model needs more is refused, "
            "and a node whose resident memory passes 1.5 x memory_mb + 512 MB (+2 GB on a GPU node) is "
            "stopped"))] = None,
        num_cpus: Annotated[float, Field(gt=0, le=256, description=(
            "CPUs each node reserves: its Ray placement-group bundle (launcher ray), docker run --cpus (launcher "
            "docker)"))] = 1.0,
        num_gpus: Annotated[float, Field(ge=0, le=16, description=(
            "GPUs each node reserves (launcher ray: Ray sets CUDA_VISIBLE_DEVICES; launcher docker: docker run "
            "--gpus); "
            "launcher subprocess refuses it on a machine without GPUs"))] = 0.0,
    ) -> r.DeployReply:
        """Start node processes; returns once each answers its health check (or with each failure's text)."""
        if model == "custom" and not layers:
            raise ToolError("model 'custom' needs a `layers` list, e.g. [{\"type\": \"dense\", \"units\": 64}, "
                            "{\"type\": \"output\"}]")
        notes = {}
        if layers and model != "custom":
            notes["model"] = f"a layer list was given: the node's model is built from it ('{model}' preset not used)"
            model = "custom"
        if role and node_type and role != node_type:
            notes["node_type"] = f"role '{role}' wins over node_type '{node_type}'"
        for i, layer in enumerate(layers or []):
            if layer.vocab_size is not None:
                notes[f"layers[{i}].vocab_size"] = "the dataset's tokenizer decides the vocabulary size"
            for key in layer.model_extra or {}:
                notes[f"layers[{i}].{key}"] = f"not a key of a {layer.type!r} layer spec here"
        reply = await call(
            app.clusters.deploy_nodes, cluster_id, role=role or node_type or "worker", count=count, model=model,
            capabilities=list(dict.fromkeys(capabilities)), autonomy=autonomy, template=template,
            layers=[layer.model_dump(exclude_none=True) for layer in layers] if layers else None,
            memory_mb=memory_mb, num_cpus=num_cpus, num_gpus=num_gpus,
            options={"behavior": {"kind": behavior, "scale": behavior_scale}} if behavior != "honest" else None,
        )
        return reply.model_copy(update={"group": group_change_hinted(reply.group), "ignored": notes})

    @tool(mcp, title="Remove a node", annotations=DESTROYS)
    async def neural_node_remove(node_id: NodeId) -> r.NodeRemoveReply:
        """Stop one node and take it out of its cluster; a connected cluster re-forms its group. During
        training the session lets the node go at its next epoch / round boundary (elastic scale-in: the rest
        re-form, re-shard the data and carry the model on) and the node is stopped there."""
        reply = await call(app.clusters.remove_node, node_id)
        return reply.model_copy(update={"group": group_change_hinted(reply.group)})

    @tool(mcp, title="Node log", annotations=READ_ONLY)
    async def neural_node_logs(
        node_id: NodeId,
        tail: Annotated[int, Field(ge=1, le=5000, description="Number of lines from the end")] = 100,
    ) -> r.NodeLogsReply:
        """The end of one node's log, to see why a node failed."""
        return await call(app.clusters.node_logs, node_id, tail)

    @tool(mcp, title="Upload a file to one node", annotations=REPLACES)
    async def neural_node_upload(
        node_id: NodeId,
        file_name: Annotated[str, Field(min_length=1, max_length=255, description=(
            "Relative name inside the node's sandbox, e.g. data/mine.csv (at most 255 bytes per path component)"))],
        content: Annotated[str, Field(max_length=MAX_UPLOAD_CHARS, description=(
            "File content (text, or base64 with encoding='base64'); at most FLOW_NEXUS_MAX_UPLOAD_BYTES "
            "(default 8 MiB) once decoded"))],
        encoding: Annotated[Literal["text", "base64"], Field(description=(
            "How `content` is written: text as UTF-8, or base64 decoded to bytes"))] = "text",
    ) -> r.UploadReply:
        """Write a file into one node's sandbox, so only that node reads it (federated privacy).
        Train with dataset=<file_name> and each node reads the file of that name in its own sandbox."""
        return await call(app.clusters.upload, node_id, file_name, content, encoding)
