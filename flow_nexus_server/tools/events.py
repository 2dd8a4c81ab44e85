"""Event tools: a training session's events, as a polling tool and as a resource."""

from __future__ import annotations

import json
from typing import Annotated

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.states import SessionState
from flow_nexus_server.tools.common import READ_ONLY, App, call, tool


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="Session events", annotations=READ_ONLY, ignored={
        "stream_type": "a session has one stream here: all its events (epochs, checkpoints, nodes), oldest first",
    })
    async def execution_stream_subscribe(
        deployment_id: Annotated[str, Field(min_length=1, max_length=64, description="The training session id")],
        stream_type: Annotated[str | None, Field(max_length=64, description=(
            "Flow Nexus stream kind (e.g. claude-flow-swarm); accepted, changes nothing (reported in `ignored`)"))
        ] = None,
        cursor: Annotated[int, Field(ge=0, le=2**62, description="Last event id seen; 0 for all")] = 0,
        wait_s: Annotated[float, Field(ge=0, le=60, description="How long to wait for new events when there are "
                                                                "none")] = 10,
        limit: Annotated[int, Field(ge=1, le=500, description="Most events returned in one reply")] = 100,
    ) -> r.EventStreamReply:
        """A session's events after `cursor` (epoch done, checkpoint saved, node lost), waiting briefly for new ones."""
        row = await call(app.training.session, deployment_id)
        deadline = anyio.current_time() + wait_s
        while True:
            events = await call(app.clusters.store.session_events, deployment_id, cursor, limit)
            status = (await call(app.training.session, deployment_id)).status
            if events or anyio.current_time() >= deadline or status != SessionState.RUNNING:
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
            await call(app.training.session, session_id)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        events = await call(app.clusters.store.session_events, session_id, 0, 10_000)
        return json.dumps([r.EventInfo(id=e.id, time=e.time, kind=e.kind, message=e.message, node_id=e.node_id,
                                       data=e.data).model_dump() for e in events])
