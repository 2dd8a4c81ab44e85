"""The endpoint table (workers.api) is the one node-API contract: every row is served by the agent
method of its name, called by the client method of its name, and routed by (method, path) alone."""

from __future__ import annotations

from flow_nexus_server.service.node_client import NodeClient
from workers import api, protocol
from workers.agent import NodeAgent


def test_every_endpoint_has_an_agent_method_and_a_unique_route():
    assert len({(ep.method, ep.path) for ep in api.NODE_API}) == len(api.NODE_API)
    assert len({ep.name for ep in api.NODE_API}) == len(api.NODE_API)
    served_elsewhere = {api.SHUTDOWN.name}  # the agent's process, not the NodeAgent, stops serving
    assert [ep.name for ep in api.NODE_API if not hasattr(NodeAgent, ep.name)] == sorted(served_elsewhere)


def test_client_methods_are_table_rows():
    client_methods = {name for name in vars(NodeClient) if not name.startswith("_") and name != "call"}
    assert client_methods <= {ep.name for ep in api.NODE_API}


def test_join_timeout_follows_the_request():
    req = protocol.JoinRequest(generation=0, rank=0, world_size=1, store_host="h", store_port=1, store_prefix="p",
                               timeout_s=10)
    assert api.JOIN.timeout_for(req) == 25
    assert api.HEALTH.timeout_for(None) == 3


def test_schema_export_covers_every_model_of_the_table():
    names = {m.__name__ for m in api.models()}
    assert {"ErrorReply", "TelemetryPush", "LeaveReply", "ShutdownReply"} <= names
    assert {row["reply"] for row in api.describe()} <= names
