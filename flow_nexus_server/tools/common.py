"""What every tool area shares: the service accessor, the ``call`` helper, annotations, id types."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, create_model

from flow_nexus_server import replies as r
from flow_nexus_server.controller.core import Controller
from flow_nexus_server.launchers import LaunchError
from flow_nexus_server.registry.service import RegistryService
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import NextStep, ServiceError
from flow_nexus_server.service.inference import InferenceService
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.service.training import TrainingService
from flow_nexus_server.states import ClusterState

log = logging.getLogger(__name__)
T = TypeVar("T")

ClusterId = Annotated[str, Field(min_length=1, max_length=64, description="Cluster id from neural_cluster_init "
                                                                          "(dnc_...)")]
NodeId = Annotated[str, Field(min_length=1, max_length=64, description="Node id from neural_node_deploy (node_...)")]

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
RECONFIGURES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                               open_world_hint=False)
DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)
# Overwrites what nodes serve or hold (the loaded model, a sandbox file); the same call again changes nothing more.
REPLACES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
# Starts a session whose result replaces the model every node serves; each call trains anew.
RETRAINS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)


# Each next step a service names, as the tool call that takes it: services know nothing of tools.
NEXT_STEP_HINTS: dict[NextStep, str] = {
    NextStep.INIT_CLUSTER: "create a new one with neural_cluster_init",
    NextStep.LIST_CLUSTERS: "call neural_cluster_list to see clusters or neural_cluster_init to create one",
    NextStep.TERMINATE_CLUSTER: "terminate one with neural_cluster_terminate first",
    NextStep.TERMINATE_NODES: "neural_cluster_terminate stops the nodes themselves",
    NextStep.DEPLOY: "call neural_node_deploy first",
    NextStep.DEPLOY_INFERENCE: "deploy one with neural_node_deploy",
    NextStep.DEPLOY_WORKERS: "deploy workers with neural_node_deploy(role='worker')",
    NextStep.REMOVE_NODES: "remove nodes with neural_node_remove or create a cluster with a larger max_nodes",
    NextStep.CHECK_NODES: "check the node with neural_node_logs, remove it with neural_node_remove, then call "
                          "neural_cluster_connect",
    NextStep.LIST_NODES: "neural_cluster_status lists a cluster's nodes",
    NextStep.CONNECT: "call neural_cluster_connect to form the process group",
    NextStep.CHOOSE_BACKEND: "a cluster's backend is chosen in neural_cluster_init",
    NextStep.UPLOAD: "upload the data to the nodes with neural_node_upload",
    NextStep.TRAIN: "call neural_train_distributed",
    NextStep.TRAIN_OR_LOAD: "train with neural_train_distributed or load one with neural_model_load",
    NextStep.STOP_TRAINING: "stop it with neural_training_stop or wait for it to finish",
    NextStep.LIST_CHECKPOINTS: "neural_training_status lists a session's checkpoints",
    NextStep.FIND_SESSION: "neural_cluster_status shows a cluster's current session",
    NextStep.LIST_TEMPLATES: "neural_list_templates lists them",
}


def with_hint(message: str, next_step: NextStep | None) -> str:
    """``message`` followed by the tool call that takes ``next_step``."""
    return f"{message}; {NEXT_STEP_HINTS[next_step]}" if next_step else message


def group_change_hinted(change: r.GroupChange) -> r.GroupChange:
    return change.model_copy(update={"message": with_hint(change.message, change.next_step)})


def cluster_init_hinted(reply: r.ClusterInitReply) -> r.ClusterInitReply:
    deploy = f"deploy nodes with neural_node_deploy(cluster_id='{reply.cluster_id}')"
    return reply.model_copy(update={"next_step": deploy})


def cluster_status_hinted(reply: r.ClusterStatusReply) -> r.ClusterStatusReply:
    if reply.group_state == "formed" or reply.status == ClusterState.TERMINATED:
        return reply
    return reply.model_copy(update={"group_message": with_hint(reply.group_message, NextStep.CONNECT)})


def training_started_hinted(reply: r.TrainStartReply) -> r.TrainStartReply:
    follow = f"follow it with neural_training_status(session_id='{reply.session_id}') or neural_cluster_status"
    return reply.model_copy(update={"message": f"{reply.message}; {follow}"})


class App:
    """The tools' way to the controller's services: the controller given to ``build_server``, or the one
    the server's lifespan starts (so a service is looked up when a tool runs, not when it is declared)."""

    def __init__(self, controller: Controller | None = None) -> None:
        self.controller = controller

    def ctrl(self) -> Controller:
        assert self.controller is not None, "the server's lifespan has not started"
        return self.controller

    @property
    def clusters(self) -> ClusterService:
        return self.ctrl().clusters

    @property
    def training(self) -> TrainingService:
        return self.ctrl().training

    @property
    def inference(self) -> InferenceService:
        return self.ctrl().inference

    @property
    def registry(self) -> RegistryService:
        return self.ctrl().registry


def tool(mcp: MCPServer, *, title: str, annotations: ToolAnnotations,
         ignored: dict[str, str] | None = None, sparse: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``mcp.tool`` with the docstring as the description, its continuation lines unindented, and a
    reply model answered as compact JSON text (``compact_reply``).

    No argument is accepted silently: ``ignored`` names the parameters kept for Flow Nexus
    compatibility that change nothing here (with a one-line reason); those the client sent come back
    in the reply's ``ignored``, and every argument the tool does not declare in its ``unknown``
    (the SDK's argument model would drop them without a word).

    ``sparse`` (the polled status tools): a value not known yet is left out of the reply rather
    than sent as null, and the published schema says so (``output_schemas.absent_when_unknown``).
    Every client validates every reply against the schema; on a 4-node status reply the nullable
    fields' ``anyOf`` branches were half of that cost."""

    def declare(fn: Callable[..., T]) -> Callable[..., T]:
        returns_model = _returns_model(fn)

        @functools.wraps(fn)  # the SDK reads the parameters and the output model through __wrapped__
        async def published(*args: Any, **kwargs: Any) -> Any:
            unknown = sorted(kwargs.pop(EXTRA_KEY, {}))
            sent = kwargs.pop(SENT_KEY, set())
            reply = await fn(*args, **kwargs)
            notes = {name: why for name, why in (ignored or {}).items() if name in sent}
            if isinstance(reply, CallToolResult):
                return result_with_compat_notes(reply, notes, unknown)
            if not returns_model:
                return reply
            return compact_reply(with_compat_notes(reply, notes, unknown), sparse=sparse)

        published.sparse_reply = sparse  # type: ignore[attr-defined]  # read by output_schemas
        mcp.tool(title=title, annotations=annotations, description=inspect.cleandoc(fn.__doc__ or ""))(published)
        _keep_unknown_arguments(mcp, fn.__name__)
        return fn

    return declare


EXTRA_KEY = "__unknown_arguments__"
SENT_KEY = "__sent_arguments__"


class _ArgumentsKeepingExtras(ArgModelBase):
    """A tool's argument model that keeps undeclared arguments (pydantic would drop them) and says
    which arguments the client sent, so the reply can name both."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return super().model_dump_one_level() | {EXTRA_KEY: dict(self.__pydantic_extra__ or {}),
                                                  SENT_KEY: set(self.model_fields_set)}


def _keep_unknown_arguments(mcp: MCPServer, name: str) -> None:
    registered = mcp._tool_manager.get_tool(name)  # noqa: SLF001 - the SDK has no public way to reach a Tool
    assert registered is not None
    meta = registered.fn_metadata
    meta.arg_model = create_model(meta.arg_model.__name__, __base__=(_ArgumentsKeepingExtras, meta.arg_model))


def with_compat_notes(reply: T, ignored: dict[str, str], unknown: list[str]) -> T:
    """``reply`` with the arguments it ignored and the ones it does not know (merged with any the tool set)."""
    if not isinstance(reply, r.ToolReply):
        return reply
    return reply.model_copy(update={"ignored": reply.ignored | ignored,
                                    "unknown": sorted({*reply.unknown, *unknown})})


def result_with_compat_notes(result: CallToolResult, ignored: dict[str, str], unknown: list[str]) -> CallToolResult:
    """A hand-built result (an image and its info) with the same notes in its structured content and text."""
    if result.structured_content is None:
        return result
    structured = result.structured_content | {"ignored": ignored, "unknown": unknown}
    note = compat_sentence(ignored, unknown)
    return result.model_copy(update={
        "structured_content": structured,
        "content": [*result.content, *([TextContent(type="text", text=note)] if note else [])]})


def compat_sentence(ignored: dict[str, str], unknown: list[str]) -> str | None:
    """What the model must read about arguments that changed nothing, in words; None when there are none."""
    parts = []
    if ignored:
        parts.append("ignored (accepted for compatibility, changes nothing here): "
                     + "; ".join(f"{name}: {why}" for name, why in ignored.items()))
    if unknown:
        parts.append(f"unknown to this server and not used: {', '.join(unknown)}")
    return "Note on arguments: " + ". ".join(parts) + "." if parts else None


def compact_reply(reply: BaseModel, *, sparse: bool = False) -> CallToolResult:
    """The reply as structured content plus the same JSON as text for clients that read only text.
    The SDK would indent that text: compact, a status reply is about half the bytes to send and parse
    and half the tokens in a model's context. The SDK still validates it against the output model.
    Arguments ignored or unknown are also said in a sentence, so a model reading text sees them.
    ``sparse``: fields whose value is None are left out (see ``tool``)."""
    content = [TextContent(type="text", text=reply.model_dump_json(by_alias=True, exclude_none=sparse))]
    if isinstance(reply, r.ToolReply) and (note := compat_sentence(reply.ignored, reply.unknown)):
        content.append(TextContent(type="text", text=note))
    return CallToolResult(content=content,
                          structured_content=reply.model_dump(mode="json", by_alias=True, exclude_none=sparse))


def _returns_model(fn: Callable[..., Any]) -> bool:
    returns = inspect.signature(fn, eval_str=True).return_annotation
    return inspect.isclass(returns) and issubclass(returns, BaseModel)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking service call on a worker thread; service errors become ToolErrors, and so
    does anything unexpected: logged with its traceback, answered with a sentence naming the tool
    (the SDK's own answer would be a bare "Error executing tool X")."""
    with tool_errors(sys._getframe(1).f_code.co_name):  # the tool function awaiting this call
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def call_in_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a memory-only service read on the event loop: on a busy CPU the hop to a worker thread
    and back costs more than the read itself. Errors map as in ``call``."""
    with tool_errors(sys._getframe(1).f_code.co_name):
        return fn(*args, **kwargs)


@contextmanager
def tool_errors(tool_name: str) -> Iterator[None]:
    """What a client reads when a service call fails: the service's sentence with its next step,
    or, for anything unexpected, a sentence naming the tool (the traceback goes to the log)."""
    try:
        yield
    except (ServiceError, NodeRequestError, LaunchError) as exc:
        raise ToolError(with_hint(str(exc), getattr(exc, "next_step", None))) from exc
    except Exception as exc:
        log.exception("unexpected error in %s", tool_name)
        raise ToolError(f"internal error in {tool_name}: {type(exc).__name__}; see server.log in the server's state "
                        "home for the details") from exc


def model_fields_as_parameters(model: type[BaseModel]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Publish every field of ``model`` as a flat parameter of the decorated tool (clients send them
    flat, as Flow Nexus does) without listing them again: the SDK reads a tool's parameters from its
    ``__signature__`` and ``__annotations__``. The tool takes the fields in its ``**kwargs``."""

    def declare(fn: Callable[..., T]) -> Callable[..., T]:
        own = inspect.signature(fn, eval_str=True)
        params = [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in own.parameters.values()
                  if q.kind is not inspect.Parameter.VAR_KEYWORD]
        for name, info in model.model_fields.items():
            annotation = Annotated[(info.annotation, *info.metadata, Field(description=info.description))]
            default = inspect.Parameter.empty if info.is_required() else info.default
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=default))
        fn.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        fn.__annotations__ = {q.name: q.annotation for q in params} | {"return": own.return_annotation}
        return fn

    return declare
