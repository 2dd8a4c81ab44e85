"""The MCP server: its lifespan and the tools of every area (flow_nexus_server.tools.<area>)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus

from flow_nexus_server import __version__, completions, log_level, prompts
from flow_nexus_server.config import Settings
from flow_nexus_server.controller.core import Controller
from flow_nexus_server.output_schemas import flatten_output_schemas
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.tools import clusters, events, inference, nodes, registry, templates, training
from flow_nexus_server.tools.common import App

INSTRUCTIONS = """\
Real distributed PyTorch training. Typical flow: neural_cluster_init -> neural_node_deploy
(count=N) -> neural_cluster_connect -> neural_cluster_status -> neural_cluster_terminate.
Every figure these tools report was measured on the running node processes."""


def build_server(settings: Settings | None = None, service: ClusterService | None = None, *,
                 controller: Controller | None = None, token_verifier: Any = None, auth: Any = None) -> MCPServer:
    """One factory for the controller process, stdio, HTTP and the in-memory test client.

    With ``controller`` (the controller process) every connection shares its running services;
    without one, the server's lifespan starts a ``Controller`` and closes it, stopping its nodes,
    when the client leaves (in-process use)."""
    bus = controller.bus if controller is not None else InMemorySubscriptionBus()
    app = App(controller)
    mcp = MCPServer("flow-nexus-server", version=__version__, instructions=INSTRUCTIONS,
                    lifespan=_lifespan(app, settings, service, bus), token_verifier=token_verifier, auth=auth,
                    subscriptions=bus)
    for area in (clusters, nodes, training, inference, registry, templates, events):
        area.register(mcp, app)
    prompts.register(mcp)
    completions.register(mcp, lambda: app.clusters.store)
    log_level.register(mcp)
    flatten_output_schemas(mcp)
    return mcp


def _lifespan(app: App, settings: Settings | None, service: ClusterService | None,
              bus: InMemorySubscriptionBus) -> Callable[[MCPServer], AbstractAsyncContextManager[None]]:
    shared = app.controller is not None

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        if shared:  # entered once per connection: the controller's services outlive it
            yield None
            return
        own = Controller(settings or Settings.from_env(), clusters=service, bus=bus)
        app.controller = own
        await own.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(own.publish_event_updates)
                yield None
                tg.cancel_scope.cancel()
        finally:
            await own.aclose(stop_nodes=True)

    return lifespan
