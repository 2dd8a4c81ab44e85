"""MCP argument completion (``completion/complete``): the ids in the store that start with what
the user typed, newest first, for the prompt and resource-template arguments that take an id;
and the built-in dataset names for the synchronous-training prompt."""

from __future__ import annotations

import functools
from collections.abc import Callable

import anyio
from mcp.server import MCPServer
from mcp.types import Completion, CompletionArgument, CompletionContext, PromptReference, ResourceTemplateReference

from flow_nexus_server.service.templates import catalog
from flow_nexus_server.store import Checkpoint, Cluster, Node, Store, TrainingSession
from workers.protocol import BUILTIN_DATASETS

MAX_VALUES = 100  # the most values one completion may carry (MCP spec)

# Argument name -> the tables whose ids it takes; deployment_id and job_id are session-id aliases.
ID_TABLES: dict[str, tuple[type, ...]] = {
    "cluster_id": (Cluster,),
    "node_id": (Node,),
    "session_id": (TrainingSession,),
    "deployment_id": (TrainingSession,),
    "job_id": (TrainingSession,),
    "model_id": (Cluster, Checkpoint),  # a model is named by its cluster or by one of its checkpoints
}


def template_ids(prefix: str) -> list[str]:
    return [tid for tid in catalog() if tid.startswith(prefix)]


def builtin_datasets(ref: PromptReference | ResourceTemplateReference,
                     argument: CompletionArgument) -> Completion | None:
    """The built-in dataset names, for the prompt that trains on one (elsewhere a dataset is a file name)."""
    if not (isinstance(ref, PromptReference) and ref.name == "synchronous_training" and argument.name == "dataset"):
        return None
    return Completion(values=[name for name in BUILTIN_DATASETS if name.startswith(argument.value)])


def complete_ids(store: Store, argument: CompletionArgument, context: CompletionContext | None) -> Completion:
    """The completion of one id argument; a ``cluster_id`` already chosen narrows nodes and sessions."""
    if argument.name == "template_id":
        ids = template_ids(argument.value)
    else:
        tables = ID_TABLES[argument.name]
        in_cluster = (context.arguments or {}).get("cluster_id") if context and argument.name != "cluster_id" else None
        ids = store.recent_ids(*tables, prefix=argument.value, cluster_id=in_cluster or None, limit=MAX_VALUES + 1)
    return Completion(values=ids[:MAX_VALUES], has_more=len(ids) > MAX_VALUES)


def register(mcp: MCPServer, store: Callable[[], Store]) -> None:
    """``store`` gives the running controller's store (it exists once the server's lifespan started)."""

    @mcp.completion()
    async def complete(ref: PromptReference | ResourceTemplateReference, argument: CompletionArgument,
                       context: CompletionContext | None) -> Completion | None:
        if argument.name != "template_id" and argument.name not in ID_TABLES:
            return builtin_datasets(ref, argument)
        return await anyio.to_thread.run_sync(functools.partial(complete_ids, store(), argument, context))
