"""HTTP client for the node control API (token on every request); paths and timeouts come from
the endpoint table in ``workers.api``."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel

from workers import api
from workers import protocol as p
from workers.api import Endpoint

M = TypeVar("M", bound=BaseModel)


class NodeRequestError(RuntimeError):
    """A node answered with an error or did not answer; the message says which."""

    def __init__(self, node_id: str, message: str, status: int | None = None) -> None:
        super().__init__(f"node {node_id}: {message}")
        self.node_id = node_id
        self.status = status


# One pooled client for every node: keep-alive connections, no per-request set-up cost.
_HTTP = httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=200, max_keepalive_connections=100))


class NodeClient:
    """Calls one node's control API; each method is a row of the endpoint table (workers.api)."""

    def __init__(self, node_id: str, host: str, port: int, token: str) -> None:
        self.node_id = node_id
        self.base = f"http://{host}:{port}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, endpoint: Endpoint[M], body: BaseModel | None = None, query: dict[str, int] | None = None,
             timeout: float | None = None) -> M:
        """The endpoint's reply; ``timeout`` overrides the table's."""
        target = endpoint.path + (f"?{urlencode(query)}" if query else "")
        wait = endpoint.timeout_for(body) if timeout is None else timeout
        try:
            r = _HTTP.request(endpoint.method, self.base + target,
                              content=body.model_dump_json() if body is not None else None,
                              headers=self._headers, timeout=wait)
        except httpx.TimeoutException as exc:
            raise NodeRequestError(self.node_id, f"no answer to {target} within {wait:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise NodeRequestError(self.node_id, f"cannot reach the control API ({exc})") from exc
        if r.status_code != 200:
            try:
                detail = api.ERROR_REPLY.model_validate_json(r.content).error
            except ValueError:
                detail = r.text
            raise NodeRequestError(self.node_id, detail, r.status_code)
        return endpoint.reply.model_validate_json(r.content)

    def health(self, timeout: float | None = None) -> p.HealthReply:
        return self.call(api.HEALTH, timeout=timeout)

    def host_store(self, req: p.StoreRequest) -> p.StoreReply:
        return self.call(api.HOST_STORE, req)

    def lease(self, req: p.LeaseRequest) -> p.HealthReply:
        """Point the node's telemetry (and its lease) at this controller; its health comes back."""
        return self.call(api.LEASE, req)

    def join(self, req: p.JoinRequest) -> p.JoinReply:
        return self.call(api.JOIN, req)

    def probe(self, req: p.ProbeRequest) -> p.ProbeReply:
        return self.call(api.PROBE, req)

    def validate_job(self, job: p.TrainJob) -> p.DatasetCheck:
        return self.call(api.VALIDATE_JOB, job)

    def start_training(self, job: p.TrainJob) -> p.TrainStarted:
        return self.call(api.START_TRAINING, job)

    def training_status(self, cursor: int = 0) -> p.TrainProgress:
        return self.call(api.TRAINING_STATUS, query={"cursor": cursor})

    def stop_training(self) -> p.TrainProgress:
        return self.call(api.STOP_TRAINING)

    def model_info(self) -> p.ModelInfo:
        return self.call(api.MODEL_INFO)

    def predict(self, req: p.PredictRequest) -> p.PredictReply:
        return self.call(api.PREDICT, req)

    def generate(self, req: p.GenerateRequest) -> p.GenerateReply:
        return self.call(api.GENERATE, req)

    def generate_step(self, req: p.GenerateStepRequest) -> p.GenerateStepReply:
        return self.call(api.GENERATE_STEP, req)

    def benchmark(self, req: p.BenchmarkRequest) -> p.BenchmarkReply:
        return self.call(api.BENCHMARK, req)

    def export_model(self, req: p.ExportRequest) -> p.ExportReply:
        return self.call(api.EXPORT_MODEL, req)

    def load_model(self, req: p.LoadRequest) -> p.ModelInfo:
        return self.call(api.LOAD_MODEL, req)

    def bench_collectives(self, req: p.CollectiveBenchRequest) -> p.CollectiveBenchReply:
        return self.call(api.BENCH_COLLECTIVES, req)

    def shutdown(self) -> None:
        self.call(api.SHUTDOWN)
