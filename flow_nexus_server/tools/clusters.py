"""Cluster tools: create, connect, list, inspect and terminate clusters."""

from __future__ import annotations

from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.tools.common import (
    CREATES,
    DESTROYS,
    READ_ONLY,
    RECONFIGURES,
    App,
    ClusterId,
    call,
    call_in_loop,
    cluster_init_hinted,
    cluster_status_hinted,
    tool,
)
from workers.protocol import ArchitectureChoice, BackendChoice, Consensus, Launcher, Topology, architecture_refusal


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Create a cluster", annotations=CREATES, ignored={
        "wasmOptimization": "nodes run PyTorch natively; there is no WebAssembly runtime here (stored, echoed)",
        "daaEnabled": "no decentralized autonomous agents run here; nodes do what the tools ask (stored, echoed)",
        "replication_factor": "models are replicated on every serving node already; checkpoints are kept by "
                              "max_checkpoints (stored, echoed)",
    })
    async def neural_cluster_init(
        name: Annotated[str, Field(min_length=1, max_length=200, description="Cluster name")],
        topology: Annotated[Topology, Field(description="How nodes exchange gradients/models")] = "mesh",
        architecture: Annotated[ArchitectureChoice,
                                Field(description="Model family trained on this cluster")] = "transformer",
        wasmOptimization: Annotated[bool, Field(description="Accepted for Flow Nexus compatibility; stored, changes "
                                                            "nothing (reported in `ignored`)")] = True,
        daaEnabled: Annotated[bool, Field(description="Accepted for Flow Nexus compatibility; stored, changes "
                                                      "nothing (reported in `ignored`)")] = True,
        consensus: Annotated[Consensus,
                             Field(description="How updates are agreed on (see docs)")] = "proof-of-learning",
        launcher: Annotated[Launcher, Field(description="Where node processes run")] = "subprocess",
        backend: Annotated[BackendChoice, Field(description="torch.distributed backend; auto = nccl when every node "
                                                            "sees a GPU, else gloo")] = "auto",
        max_nodes: Annotated[int, Field(ge=1, le=1000, description=(
            "Most nodes this cluster may hold (at most FLOW_NEXUS_MAX_NODES_PER_CLUSTER); each deploy is still "
            "refused, with the numbers, when the host's memory or FLOW_NEXUS_MAX_NODE_PROCESSES cannot take it"))
        ] = 100,
        auto_healing: Annotated[bool,
                                Field(description="Replace failed nodes and resume from the last checkpoint")] = False,
        replication_factor: Annotated[int, Field(ge=1, le=8, description=(
            "Accepted for compatibility; stored, changes nothing (reported in `ignored`)"))] = 1,
        idle_timeout_min: Annotated[float, Field(ge=0, le=10_080, description=(
            "Stop the cluster by itself after this many minutes with no training session running and no "
            "MCP client attached to the server (0 = never)"))] = 30,
    ) -> r.ClusterInitReply:
        """Create a cluster record and its directory. No process starts until neural_node_deploy."""
        if refusal := architecture_refusal(architecture):
            raise ToolError(refusal)
        return cluster_init_hinted(await call(
            app.clusters.init_cluster, name=name, topology=topology, architecture=architecture, consensus=consensus,
            launcher=launcher, backend=backend, max_nodes=max_nodes, auto_healing=auto_healing,
            wasm_optimization=wasmOptimization, daa_enabled=daaEnabled,
            extra={"replication_factor": replication_factor, "idle_timeout_min": idle_timeout_min},
        ))

    @tool(mcp, title="Form the process group", annotations=RECONFIGURES)
    async def neural_cluster_connect(
        cluster_id: ClusterId,
        topology: Annotated[Topology | None, Field(description="Override the cluster's topology")] = None,
    ) -> r.ConnectReply:
        """Join every node into a torch.distributed group (new generation) and measure each topology edge."""
        return await call(app.clusters.connect, cluster_id, topology)

    @tool(mcp, title="Cluster status", annotations=READ_ONLY, sparse=True)
    async def neural_cluster_status(cluster_id: ClusterId) -> r.ClusterStatusReply:
        """Live state of every node (alive, pid, RSS, rank, heartbeat) merged with the store, and the current
        session in the guides' shape: training_sessions, worker / parameter_server / aggregator stats,
        convergence_rate, estimated_completion, throughput (all measured, read from memory). A figure not
        measured yet is left out of the reply (never sent as null)."""
        if app.clusters.rows_cached(cluster_id):  # the usual case: nothing but memory to read
            return cluster_status_hinted(call_in_loop(app.training.cluster_status, cluster_id))
        return cluster_status_hinted(await call(app.training.cluster_status, cluster_id))

    @tool(mcp, title="List clusters", annotations=READ_ONLY)
    async def neural_cluster_list(
        include_terminated: Annotated[bool, Field(description="Also list terminated clusters")] = True,
    ) -> r.ClusterListReply:
        """Every cluster in the store with its live node count."""
        return await call(app.clusters.list_clusters, include_terminated)

    @tool(mcp, title="Terminate a cluster", annotations=DESTROYS)
    async def neural_cluster_terminate(cluster_id: ClusterId) -> r.TerminateReply:
        """Export the final model (pytorch format), stop every node (graceful, then forced) and verify each
        process is gone; the reply lists the artifacts left on disk (export, checkpoints, logs)."""
        return await call(app.training.terminate_cluster, cluster_id,
                          lambda: app.inference.final_export(cluster_id))
