"""The node control API as one table: every endpoint's method, path, request, reply and timeout.

The node agent routes from this table (``workers.agent.make_handler``), the server's
``NodeClient`` looks up each call's path and timeout here, and ``flow-nexus-server schemas``
writes the models it names (``schemas/node-api/``) and the table itself
(``schemas/node-api/endpoints.json``). A new endpoint is one row here, a ``NodeAgent`` method of
the same name and, when the server calls it, a one-line ``NodeClient`` method.

Every request carries ``Authorization: Bearer <cluster token>``, checked from the headers before
any body is read. POST bodies and all replies are JSON encodings of the models named; an error
reply (any status but 200) is an ``ErrorReply``. Torch-free, like ``workers.protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from workers import protocol as p

R = TypeVar("R", bound=BaseModel)

ERROR_REPLY = p.ErrorReply
"""The body of every error reply, of the node API and of the controller's telemetry listener."""


@dataclass(frozen=True)
class Endpoint(Generic[R]):
    name: str  # the NodeAgent method that serves it and the NodeClient method that calls it
    method: Literal["GET", "POST"]
    path: str
    request: type[BaseModel] | None  # the JSON body; None: no body
    reply: type[R]
    timeout_s: float | Callable[[Any], float]  # how long the client waits; a callable reads the request
    summary: str
    query: tuple[str, ...] = ()  # integer query parameters, passed to the agent method by name (0 when absent)

    def timeout_for(self, request: BaseModel | None) -> float:
        return self.timeout_s(request) if callable(self.timeout_s) else self.timeout_s


def _join_timeout(req: p.JoinRequest) -> float:
    """2 x the request's timeout_s + 5"""
    # The node gives up after twice the group timeout (workers.agent); 5 s more lets its 504 arrive.
    return req.timeout_s * 2 + 5


HEALTH = Endpoint("health", "GET", "/health", None, p.HealthReply, 3.0,
                  "Identity, resources and group membership of the node, measured now")
HOST_STORE = Endpoint("host_store", "POST", "/store", p.StoreRequest, p.StoreReply, 30.0,
                      "Host the cluster's rendezvous store (a node that cannot listen says so within about 15 s)")
LEASE = Endpoint("lease", "POST", "/lease", p.LeaseRequest, p.HealthReply, 3.0,
                 "Push telemetry to this controller from now on and hold the lease on it")
JOIN = Endpoint("join", "POST", "/join", p.JoinRequest, p.JoinReply, _join_timeout,
                "Join the torch.distributed process group of a generation")
PROBE = Endpoint("probe", "POST", "/probe", p.ProbeRequest, p.ProbeReply, 120.0,
                 "Measure round trip and bandwidth of the edges from this node's rank")
BENCH_COLLECTIVES = Endpoint("bench_collectives", "POST", "/bench/collectives", p.CollectiveBenchRequest,
                             p.CollectiveBenchReply, 300.0, "Time collectives along each topology")
LEAVE = Endpoint("leave", "POST", "/leave", None, p.LeaveReply, 35.0, "Leave the process group")
VALIDATE_JOB = Endpoint("validate_job", "POST", "/train/validate", p.TrainJob, p.DatasetCheck, 120.0,
                        "Check that the job's data loads here and its model can take it")
START_TRAINING = Endpoint("start_training", "POST", "/train", p.TrainJob, p.TrainStarted, 30.0,
                          "Start the training job in the background")
TRAINING_STATUS = Endpoint("training_status", "GET", "/train/status", None, p.TrainProgress, 5.0,
                           "Progress of the current or last job, with the metric samples after the cursor",
                           query=("cursor",))
STOP_TRAINING = Endpoint("stop_training", "POST", "/train/stop", None, p.TrainProgress, 10.0,
                         "Ask the running job to stop at its next check")
MODEL_INFO = Endpoint("model_info", "GET", "/model", None, p.ModelInfo, 5.0, "The model the node serves")
PREDICT = Endpoint("predict", "POST", "/predict", p.PredictRequest, p.PredictReply, 60.0,
                   "Class probabilities for the inputs")
GENERATE = Endpoint("generate", "POST", "/generate", p.GenerateRequest, p.GenerateReply, 300.0,
                    "Continue each prompt with this node's language model")
GENERATE_STEP = Endpoint("generate_step", "POST", "/generate/step", p.GenerateStepRequest, p.GenerateStepReply, 60.0,
                         "One step of ensemble decoding: append tokens to a KV-cached decoding, answer the "
                         "next-token distribution")
BENCHMARK = Endpoint("benchmark", "POST", "/model/benchmark", p.BenchmarkRequest, p.BenchmarkReply, 300.0,
                     "Latency, throughput, size and accuracy of the served model")
EXPORT_MODEL = Endpoint("export_model", "POST", "/model/export", p.ExportRequest, p.ExportReply, 300.0,
                        "Write the served model and its card into a directory")
LOAD_MODEL = Endpoint("load_model", "POST", "/model/load", p.LoadRequest, p.ModelInfo, 300.0,
                      "Serve the model of an export directory or a checkpoint")
SHUTDOWN = Endpoint("shutdown", "POST", "/shutdown", None, p.ShutdownReply, 5.0,
                    "Answer, then stop the node")

NODE_API: tuple[Endpoint[Any], ...] = (
    HEALTH, HOST_STORE, LEASE, JOIN, PROBE, BENCH_COLLECTIVES, LEAVE, VALIDATE_JOB, START_TRAINING,
    TRAINING_STATUS, STOP_TRAINING, MODEL_INFO, PREDICT, GENERATE, GENERATE_STEP, BENCHMARK, EXPORT_MODEL,
    LOAD_MODEL, SHUTDOWN,
)
"""What a node serves."""

TELEMETRY = Endpoint("telemetry", "POST", p.TELEMETRY_PATH + "/{cluster_id}/{node_id}", p.TelemetryPush,
                     p.TelemetryAck, 2.0, "A node's heartbeat, every second (workers.telemetry)")
"""What the controller serves to nodes (flow_nexus_server.service.telemetry)."""


def models() -> list[type[BaseModel]]:
    """Every top-level model of the API, once, in table order, the error reply last."""
    found = [m for ep in (*NODE_API, TELEMETRY) for m in (ep.request, ep.reply) if m is not None]
    return list(dict.fromkeys([*found, ERROR_REPLY]))


def describe() -> list[dict[str, Any]]:
    """The table as JSON-ready rows (schemas/node-api/endpoints.json)."""
    return [{"name": ep.name, "method": ep.method, "path": ep.path,
             "request": ep.request.__name__ if ep.request else None, "reply": ep.reply.__name__,
             "query": list(ep.query),
             "timeout_s": ep.timeout_s.__doc__ if callable(ep.timeout_s) else ep.timeout_s,
             "summary": ep.summary, "served_by": "controller" if ep is TELEMETRY else "node"}
            for ep in (*NODE_API, TELEMETRY)]
