"""Template tools: list the ready-made clusters and deploy one in a single call."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server import MCPServer
from pydantic import Field

from flow_nexus_server import replies as r
from flow_nexus_server.service import templates
from flow_nexus_server.tools.common import (
    CREATES,
    READ_ONLY,
    App,
    call,
    cluster_init_hinted,
    tool,
    training_started_hinted,
)


def register(mcp: MCPServer, app: App) -> None:
    @tool(mcp, title="List cluster templates", annotations=READ_ONLY)
    async def neural_list_templates(
        category: Annotated[templates.Category | None, Field(description="Only templates of this category")] = None,
        tier: Annotated[str | None, Field(max_length=32, description="Only templates of this tier (all are "
                                                                     "'free')")] = None,
        search: Annotated[str | None, Field(max_length=200, description="Words that must all appear")] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="Most templates listed")] = 20,
    ) -> r.TemplateListReply:
        """Ready-made clusters (nodes, topology, training recipe) that neural_deploy_template builds in one call."""
        return templates.list_templates(category, tier, search, limit)

    @tool(mcp, title="Deploy a template", annotations=CREATES, ignored={
        "user_id": "this server has no user accounts: clusters belong to whoever runs it",
    })
    async def neural_deploy_template(
        template_id: Annotated[str, Field(min_length=1, max_length=100, description=(
            "Id from neural_list_templates, or the Flow Nexus guides' tmpl_ spelling (tmpl_transformer_large)"))],
        custom_config: Annotated[dict[str, Any] | None, Field(description=(
            "Overrides: name, topology, architecture, consensus, auto_healing, max_nodes, workers or num_workers "
            "(count), num_parameter_servers (count), model_size (parameters such as '125M': the nearest preset, "
            "refused with the numbers when it cannot fit this host's memory), train (true to start the template's "
            "training), training (neural_train_distributed arguments)"))] = None,
        user_id: Annotated[str | None, Field(max_length=200, description=(
            "Flow Nexus account id; accepted, changes nothing (reported in `ignored`)"))] = None,
    ) -> r.TemplateDeployReply:
        """Build a whole ready cluster in one call: init, deploy every node, connect (and train if asked)."""
        reply = await call(templates.deploy_template, app.clusters, app.training, template_id, custom_config)
        return reply.model_copy(update={
            "cluster": cluster_init_hinted(reply.cluster),
            "training": training_started_hinted(reply.training) if reply.training else None})
