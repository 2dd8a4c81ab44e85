"""The MCP layer: publishes the service as tools. Thin: validate, call, return a typed reply."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from flow_nexus_server import __version__
from flow_nexus_server import replies as r
from flow_nexus_server.config import Settings
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import ServiceError

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
    """Run a blocking service call on a worker thread; service errors become ToolErrors."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    except ServiceError as exc:
        raise ToolError(str(exc)) from exc


def build_server(settings: Settings | None = None, service: ClusterService | None = None) -> MCPServer:
    """One factory for stdio, HTTP and the in-memory test client."""
    holder: dict[str, ClusterService] = {}

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        svc = service or ClusterService(settings or Settings.from_env())
        holder["svc"] = svc
        log.info("flow-nexus-server %s ready; state home %s", __version__, svc.settings.home)
        try:
            yield None
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(svc.close)
            log.info("flow-nexus-server stopped")

    def svc() -> ClusterService:
        return holder["svc"]

    mcp = MCPServer("flow-nexus-server", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan)

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
    ) -> r.ClusterInitReply:
        """Create a cluster record and its directory. No process starts until neural_node_deploy."""
        return await call(
            svc().init_cluster, name=name, topology=topology, architecture=architecture, consensus=consensus,
            launcher=launcher, backend=backend, max_nodes=max_nodes, auto_healing=auto_healing,
            wasm_optimization=wasmOptimization, daa_enabled=daaEnabled,
            extra={"replication_factor": replication_factor, "backend_requested": backend},
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
            list[dict[str, Any]] | None,
            Field(max_length=64, description="Layer specs for model 'custom', e.g. {type: embedding, embedding_dim: 64}"),
        ] = None,
        count: Annotated[int, Field(ge=1, le=16, description="How many identical nodes to deploy")] = 1,
    ) -> r.DeployReply:
        """Start node processes; returns once each answers its health check (or with each failure's text)."""
        if model == "custom" and not layers:
            raise ToolError("model 'custom' needs a `layers` list, e.g. [{\"type\": \"dense\", \"units\": 64}, {\"type\": \"output\"}]")
        return await call(
            svc().deploy_nodes, cluster_id, role=role or node_type, count=count, model=model,
            capabilities=list(dict.fromkeys(capabilities)), autonomy=autonomy, template=template, layers=layers,
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
        return await call(svc().status, cluster_id)

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
        return await call(svc().terminate, cluster_id)

    return mcp
