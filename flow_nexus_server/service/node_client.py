"""HTTP client for the node control API (token on every request)."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from workers import protocol as p

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
    def __init__(self, node_id: str, host: str, port: int, token: str) -> None:
        self.node_id = node_id
        self.base = f"http://{host}:{port}"
        self._headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, reply: type[M] | None, body: BaseModel | None = None,
             timeout: float = 10.0) -> Any:
        try:
            r = _HTTP.request(
                method,
                self.base + path,
                content=body.model_dump_json() if body is not None else None,
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=timeout,
            )
        except httpx.TimeoutException as exc:
            raise NodeRequestError(self.node_id, f"no answer to {path} within {timeout:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise NodeRequestError(self.node_id, f"cannot reach the control API ({exc})") from exc
        if r.status_code != 200:
            try:
                detail = r.json().get("error", r.text)
            except ValueError:
                detail = r.text
            raise NodeRequestError(self.node_id, detail, r.status_code)
        data = r.json()
        return reply.model_validate(data) if reply is not None else data

    def health(self, timeout: float = 3.0) -> p.HealthReply:
        return self.call("GET", "/health", p.HealthReply, timeout=timeout)

    def host_store(self, req: p.StoreRequest) -> p.StoreReply:
        # A node that cannot listen where asked says so within about 15 s (workers.rendezvous).
        return self.call("POST", "/store", p.StoreReply, req, timeout=30)

    def lease(self, req: p.LeaseRequest) -> p.HealthReply:
        """Point the node's telemetry (and its lease) at this controller; its health comes back."""
        return self.call("POST", "/lease", p.HealthReply, req, timeout=3)

    def join(self, req: p.JoinRequest) -> p.JoinReply:
        return self.call("POST", "/join", p.JoinReply, req, timeout=req.timeout_s * 2 + 5)

    def probe(self, req: p.ProbeRequest, timeout: float = 120.0) -> p.ProbeReply:
        return self.call("POST", "/probe", p.ProbeReply, req, timeout=timeout)

    def validate_job(self, job: p.TrainJob) -> p.DatasetCheck:
        return self.call("POST", "/train/validate", p.DatasetCheck, job, timeout=120)

    def start_training(self, job: p.TrainJob) -> p.TrainStarted:
        return self.call("POST", "/train", p.TrainStarted, job, timeout=30)

    def training_status(self, cursor: int = 0, timeout: float = 5.0) -> p.TrainProgress:
        return self.call("GET", f"/train/status?cursor={cursor}", p.TrainProgress, timeout=timeout)

    def stop_training(self) -> p.TrainProgress:
        return self.call("POST", "/train/stop", p.TrainProgress, timeout=10)

    def model_info(self, timeout: float = 5.0) -> p.ModelInfo:
        return self.call("GET", "/model", p.ModelInfo, timeout=timeout)

    def predict(self, req: p.PredictRequest, timeout: float = 60.0) -> p.PredictReply:
        return self.call("POST", "/predict", p.PredictReply, req, timeout=timeout)

    def benchmark(self, req: p.BenchmarkRequest) -> p.BenchmarkReply:
        return self.call("POST", "/model/benchmark", p.BenchmarkReply, req, timeout=300)

    def export_model(self, req: p.ExportRequest) -> p.ExportReply:
        return self.call("POST", "/model/export", p.ExportReply, req, timeout=300)

    def load_model(self, req: p.LoadRequest) -> p.ModelInfo:
        return self.call("POST", "/model/load", p.ModelInfo, req, timeout=300)

    def bench_collectives(self, req: p.CollectiveBenchRequest) -> p.CollectiveBenchReply:
        return self.call("POST", "/bench/collectives", p.CollectiveBenchReply, req, timeout=300)

    def leave(self) -> None:
        self.call("POST", "/leave", None, timeout=35)

    def shutdown(self) -> None:
        self.call("POST", "/shutdown", None, timeout=5)
