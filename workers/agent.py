"""The node agent: a long-lived process with an HTTP control API on loopback.

Started by a launcher as ``python -m workers.agent --node-id ... --sandbox DIR``, with the
cluster token in the environment (``FLOW_NEXUS_NODE_TOKEN``), never on the command line.
Once listening it writes ``agent.json`` (port, pid) into its sandbox so the launcher can
find it. Every request must carry ``Authorization: Bearer <token>``; it is checked from the
headers before any body is read (``workers.http_server`` bounds sizes, time and threads). The
endpoints are the rows of ``workers.api.NODE_API``, each served by the ``NodeAgent`` method of its name.

Paths a client names are served and loaded only inside the sandbox and the ``--allowed-root``
directories (``workers.paths``, set up once in ``serve``).

Started with ``--controller-url`` (or pointed at one by ``POST /lease``), the node pushes its
health and training progress to the controller every second and holds a lease on it: idle and
without its controller for the grace period, it stops itself (``workers.telemetry``).

The cluster's first node in rank order also hosts the cluster's rendezvous store (``POST
/store``, ``workers.rendezvous``), where its control API listens, for as long as it lives.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from workers import api, paths
from workers import protocol as p
from workers.http_server import BoundedHTTPServer, JSONRequestHandler, RequestError
from workers.priority import lower_cpu_priority, priority_from_environment
from workers.telemetry import TelemetryPusher

log = logging.getLogger("workers.agent")


def confined(path: str, sandbox: Path, what: str) -> Path:
    """``path`` resolved, when it lies in ``sandbox`` or the node's allowed roots; a 403 otherwise."""
    try:
        return paths.confine(path, sandbox, what=what)
    except paths.PathRefused as exc:
        raise RequestError(403, str(exc)) from exc


def rss_bytes() -> int:
    """Resident set size of this process, read now (the trainer's reading, in bytes)."""
    from workers.training.common import rss_mb

    return int(rss_mb() * 2**20)


class NodeAgent:
    """State and operations of one node; knows nothing of HTTP."""

    def __init__(self, node_id: str, cluster_id: str, role: p.Role, sandbox: Path, threads: int,
                 host: str = "127.0.0.1") -> None:
        import torch  # imported here so `--help` stays fast

        from workers.group import Membership
        from workers.rendezvous import HostedStore

        torch.set_num_threads(threads)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.role = role
        self.sandbox = sandbox
        self.started = time.time()
        self.runtime_mb = rss_bytes() / 2**20  # this process before any job: what memory_mb does not count
        self.membership = Membership()
        self.rendezvous = HostedStore(host)  # the cluster's store, when this node is its first
        # One thread runs every torch.distributed call, so collectives never interleave.
        self.dist_thread = ThreadPoolExecutor(1, thread_name_prefix="dist")
        self.stopping = threading.Event()
        self.telemetry: Any = None  # the TelemetryPusher (workers.telemetry), set by serve()
        self.jobs = 0  # start_training calls so far: the job number progress carries
        # Training: the current/last job's progress, its stop flag, and the model it left.
        self.sink: Any = None
        self.stop_flag = threading.Event()
        self.trained: Any = None  # TrainedModel the node serves predictions from
        self.trained_job: dict[str, Any] = {}  # facts of the job that produced it (dataset, split, seed)
        self.model_source: str | None = None
        self._int8: tuple[Any, Any] | None = None  # (model it was made from, quantized copy)
        self._steps: Any = None  # open ensemble decodings (workers.generation.StepSessions)

    def health(self) -> p.HealthReply:
        import torch

        from workers.devices import cuda_device_count, cuda_visible

        return p.HealthReply(
            node_id=self.node_id,
            cluster_id=self.cluster_id,
            role=self.role,
            pid=os.getpid(),
            rss_bytes=rss_bytes(),
            uptime_s=time.time() - self.started,
            torch_threads=torch.get_num_threads(),
            cuda_devices=cuda_device_count(),
            cuda_visible=cuda_visible(),
            group=self.membership.info,
            job_state=self.sink.snapshot(1 << 62).state if self.sink else p.JobState.IDLE,
            time=time.time(),
        )

    def host_store(self, req: p.StoreRequest) -> p.StoreReply:
        try:
            return self.rendezvous.ensure(req)
        except (OSError, RuntimeError) as exc:
            raise RequestError(409, f"this node cannot host the rendezvous store: {exc}") from exc

    def join(self, req: p.JoinRequest) -> p.JoinReply:
        ms = self._on_dist_thread(lambda: self.membership.join(req), req.timeout_s * 2)
        assert self.membership.info is not None
        return p.JoinReply(group=self.membership.info, join_ms=ms)

    def probe(self, req: p.ProbeRequest) -> p.ProbeReply:
        from workers.group import probe_edges

        def run() -> list[p.EdgeMeasurement]:
            return probe_edges(self.membership.require(req.generation), req)

        return p.ProbeReply(edges=self._on_dist_thread(run, 120))

    def validate_job(self, job: p.TrainJob) -> p.DatasetCheck:
        """Cheap checks before a session starts: the data loads here and the model can take it."""
        from workers.data import DatasetError, load_dataset
        from workers.models import ModelError, check_compatible
        from workers.training.setup import is_private_dataset as is_private  # the rule training applies

        self._confine_job(job)
        try:
            ds = load_dataset(job.dataset, self.sandbox)
            check_compatible(job.architecture, ds.kind)
        except (DatasetError, ModelError) as exc:
            return p.DatasetCheck(ok=False, error=str(exc))
        return p.DatasetCheck(
            ok=True, dataset=ds.name, kind=ds.kind, examples=len(ds), num_classes=ds.num_classes,
            input_shape=list(ds.input_shape),
            label_names=list(ds.label_names)[:50], private=is_private(job.dataset, self.sandbox),
            **self._memory_estimate(job, ds),
        )

    def _memory_estimate(self, job: p.TrainJob, ds: Any) -> dict[str, Any]:
        """The DatasetCheck fields of the model's size and training memory (workers.budget); none when
        the estimate cannot be made (training then reports the model's own error)."""
        from workers.budget import estimate_training_memory

        try:
            est = estimate_training_memory(job, ds)
        except Exception:
            log.info("no memory estimate for session %s", job.session_id, exc_info=True)
            return {}
        return {"parameters": est.parameters, "estimated_train_mb": round(est.train_mb, 1),
                "memory_breakdown_mb": {"model_state_mb": round(est.model_state_mb, 1),
                                        "activations_mb": round(est.activations_mb, 1),
                                        "runtime_mb": round(self.runtime_mb, 1)}}

    def _confine_job(self, job: p.TrainJob) -> p.TrainJob:
        """The job with ``resume_from`` and ``checkpoint_dir`` resolved; a 403 when either leaves the
        sandbox and allowed roots (the dataset is checked where it is loaded, in workers.data)."""
        update = {name: str(confined(value, self.sandbox, name))
                  for name, value in (("resume_from", job.resume_from), ("checkpoint_dir", job.checkpoint_dir))
                  if value}
        return job.model_copy(update=update) if update else job

    def start_training(self, job: p.TrainJob) -> p.TrainStarted:
        from workers.training import ProgressSink

        if self.membership.info is None:
            raise RequestError(409, "this node has not joined a process group; connect the cluster first")
        if self.sink is not None and self.sink.snapshot(1 << 62).state in p.BUSY_JOB_STATES:
            raise RequestError(409, "a training job is already running on this node; stop it first")
        job = self._confine_job(job)
        self.jobs += 1
        self.sink = ProgressSink(job.session_id, job.roles[self.membership.info.rank], job=self.jobs)
        self.stop_flag = threading.Event()
        self.dist_thread.submit(self._train, job, self.sink, self.stop_flag)
        return p.TrainStarted(session_id=job.session_id, state=p.JobState.PREPARING, job=self.jobs)

    def _train(self, job: p.TrainJob, sink: Any, stop: threading.Event) -> None:
        from workers.training import run_training

        try:
            sink.set_state(p.JobState.PREPARING)
            result = run_training(job, node_id=self.node_id, sandbox=self.sandbox, sink=sink, stop=stop)
            if result is not None:
                self._serve(result, job.model_dump(), f"training session {job.session_id}")
            state = sink.snapshot(1 << 62).state
            if state not in p.ENDED_JOB_STATES:
                sink.set_state(p.JobState.STOPPED if stop.is_set() else p.JobState.COMPLETED)
        except Exception as exc:
            log.exception("training session %s failed", job.session_id)
            sink.set_state(p.JobState.FAILED, error=str(exc) or type(exc).__name__)

    def training_status(self, cursor: int = 0) -> p.TrainProgress:
        if self.sink is None:
            return p.TrainProgress(session_id=None, state=p.JobState.IDLE, role=self.role)
        return self.sink.snapshot(cursor)

    def lease(self, req: p.LeaseRequest) -> p.HealthReply:
        """A (new) controller takes this node: telemetry goes to it from now on."""
        self.telemetry.point_to(req.controller_url)
        return self.health()

    def stop_training(self) -> p.TrainProgress:
        self.stop_flag.set()
        return self.training_status(1 << 62)

    # ---------------------------------------------------------------- serving
    def _serve(self, trained: Any, job: dict[str, Any], source: str) -> None:
        self.trained, self.trained_job, self.model_source, self._int8 = trained, job, source, None
        if self._steps is not None:
            self._steps.clear()  # their caches belong to the model being replaced

    def _require_model(self) -> Any:
        if self.trained is None:
            raise RequestError(409, "this node holds no model yet; train with neural_train_distributed or load one "
                                    "with neural_model_load")
        return self.trained

    def _int8_model(self) -> Any:
        from workers.inference import quantize_dynamic_int8

        trained = self._require_model()
        if self._int8 is None or self._int8[0] is not trained.model:
            self._int8 = (trained.model, quantize_dynamic_int8(trained.model))
        return self._int8[1]

    def model_info(self) -> p.ModelInfo:
        from workers.models import describe_model

        if self.trained is None:
            return p.ModelInfo(loaded=False)
        t = self.trained
        info = describe_model(t.model) if isinstance(t.model, __import__("torch").nn.Module) else {}
        return p.ModelInfo(
            loaded=True, source=self.model_source, architecture=t.architecture, preset=t.preset, kind=t.task.kind,
            parameters=int(info.get("parameters", 0)), size_mb=float(info.get("size_mb", 0.0)),
            label_names=list(t.label_names), metrics={k: float(v) for k, v in t.metrics.items()
                                                      if isinstance(v, (int, float))},
            has_local_model=t.local_model is not None, quantized=self._int8 is not None,
        )

    def predict(self, req: p.PredictRequest) -> p.PredictReply:
        from workers.inference import InferenceError, parse_inputs, predict_proba

        trained = self._require_model()
        start = time.perf_counter()
        try:
            _, labels = parse_inputs(req.inputs, trained.task, trained.label_names)
            model = self._int8_model() if req.quantized else None
            probs = predict_proba(trained, req.inputs, local=req.use_local, model=model)
        except InferenceError as exc:
            raise RequestError(400, str(exc)) from exc
        used = "int8" if req.quantized else ("local" if req.use_local and trained.local_model is not None else "global")
        return p.PredictReply(node_id=self.node_id, probabilities=probs.tolist(), labels=labels,
                              label_names=list(trained.label_names),
                              latency_ms=(time.perf_counter() - start) * 1000, model=used)

    def generate(self, req: p.GenerateRequest) -> p.GenerateReply:
        from workers.generation import generate
        from workers.inference import InferenceError
        from workers.sampling import rng_for

        trained = self._require_model()
        rng = rng_for(req.options)  # one generator for the batch: a seed reproduces all of it
        try:
            out = [generate(trained, text, req.options, local=req.use_local, rng=rng) for text in req.prompts]
        except InferenceError as exc:
            raise RequestError(400, str(exc)) from exc
        used = "local" if req.use_local and trained.local_model is not None else "global"
        return p.GenerateReply(node_id=self.node_id, continuations=out, model=used)

    def generate_step(self, req: p.GenerateStepRequest) -> p.GenerateStepReply:
        from workers.generation import StepSessions, lm_parts
        from workers.inference import InferenceError
        from workers.sampling import encode_probabilities

        trained = self._require_model()
        if self._steps is None:
            self._steps = StepSessions()
        start = time.perf_counter()
        options = p.GenerationOptions(temperature=req.temperature, max_new_tokens=1)
        try:
            _, tokenizer, context = lm_parts(trained)
            if req.close:
                done = self._steps.close(req.session)
                tokens = (done.generated if done else []) + req.tokens
                return p.GenerateStepReply(node_id=self.node_id, probabilities="", vocab_size=0,
                                           eos_id=tokenizer.eos_id, context=context, step_ms=0.0,
                                           text=tokenizer.decode([t for t in tokens if t != tokenizer.eos_id]))
            ids: list[int] = []
            if req.prompt is not None:
                decoder, ids = self._steps.open(req.session, trained, req.prompt, options)
                decoder = self._steps.step(req.session, req.tokens, context)
            else:
                decoder = self._steps.step(req.session, req.tokens, context)
            probs = decoder.distribution(req.temperature)
        except InferenceError as exc:
            raise RequestError(400, str(exc)) from exc
        return p.GenerateStepReply(node_id=self.node_id, probabilities=encode_probabilities(probs),
                                   vocab_size=int(probs.shape[0]), prompt_ids=ids, eos_id=int(tokenizer.eos_id),
                                   context=context, step_ms=(time.perf_counter() - start) * 1000)

    def _benchmark_lm(self, req: p.BenchmarkRequest, trained: Any) -> p.BenchmarkReply:
        import resource

        from workers.generation import benchmark_generation
        from workers.inference import parse_inputs
        from workers.models import describe_model
        from workers.serving import size_mb

        if req.inputs is not None:
            prompts, _ = parse_inputs(req.inputs, trained.task)
        else:
            prompts = [self._held_out_prompt(trained)]
        runs = max(3, min(req.runs, 20))  # each run is a whole generation
        gen = benchmark_generation(trained, str(prompts[0]), runs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        step = gen["token_latency_p50_ms"]
        return p.BenchmarkReply(
            node_id=self.node_id, latency_p50_ms=step, latency_p95_ms=gen["token_latency_p95_ms"],
            latency_p99_ms=gen["token_latency_p95_ms"], samples_per_second=gen["tokens_per_second"],
            parameters=int(describe_model(trained.model)["parameters"]), model_size_mb=size_mb(trained.model),
            rss_mb=rss_bytes() / 2**20, peak_rss_mb=peak, examples=len(prompts), generation=gen)

    def _held_out_prompt(self, trained: Any) -> str:
        """The first words of a held-out text the model was trained against (a fixed prompt without one)."""
        from workers.serving import held_out_texts

        texts = held_out_texts(self.trained_job, self.sandbox)
        return " ".join(texts[0].split()[:8]) if texts else "The"

    def benchmark(self, req: p.BenchmarkRequest) -> p.BenchmarkReply:
        import resource

        import numpy as np

        from workers.inference import InferenceError, latency_profile, parse_inputs, predict_proba, throughput
        from workers.models import describe_model
        from workers.serving import held_out, size_mb

        trained = self._require_model()
        try:
            if trained.task.kind == "lm":
                return self._benchmark_lm(req, trained)
            if req.inputs is not None:
                examples, labels = parse_inputs(req.inputs, trained.task, trained.label_names)
            else:
                data = held_out(self.trained_job, self.sandbox)
                if data is None:
                    raise RequestError(400, "no held-out data is readable on this node; pass input_data with labels")
                examples, labels = data[0], list(map(int, data[1]))

            def measure(model: Any) -> dict[str, float]:
                lat = latency_profile(trained, examples[:1] if not isinstance(examples, list) else examples[:1],
                                      runs=req.runs, model=model)
                batch = examples[:256]
                out = {"p50": lat["p50_ms"], "p95": lat["p95_ms"], "p99": lat["p99_ms"],
                       "samples_per_second": throughput(trained, batch, seconds=0.5, model=model),
                       "size_mb": size_mb(model if model is not None else trained.model)}
                if labels is not None:
                    probs = predict_proba(trained, examples, model=model)
                    out["accuracy"] = float((np.argmax(probs, 1) == np.asarray(labels)).mean())
                return out

            base = measure(None)
            int8 = measure(self._int8_model()) if req.quantized else None
        except InferenceError as exc:
            raise RequestError(400, str(exc)) from exc
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return p.BenchmarkReply(
            node_id=self.node_id, latency_p50_ms=base["p50"], latency_p95_ms=base["p95"], latency_p99_ms=base["p99"],
            samples_per_second=base["samples_per_second"], parameters=int(describe_model(trained.model)["parameters"]),
            model_size_mb=base["size_mb"], rss_mb=rss_bytes() / 2**20, peak_rss_mb=peak,
            examples=len(examples), accuracy=base.get("accuracy"),
            int8={k: v for k, v in int8.items()} if int8 else None,
        )

    def export_model(self, req: p.ExportRequest) -> p.ExportReply:
        from workers.serving import ServingError, export_model

        trained = self._require_model()
        try:
            files = export_model(trained, confined(req.directory, self.sandbox, "export destination"), req.format,
                                 req.card, self.trained_job)
        except ServingError as exc:
            raise RequestError(400, str(exc)) from exc
        return p.ExportReply(directory=req.directory, files=[str(f) for f in files],
                             bytes=sum(f.stat().st_size for f in files))

    def load_model(self, req: p.LoadRequest) -> p.ModelInfo:
        from workers.serving import ServingError, load_any
        from workers.training.common import TrainingError

        try:
            trained, job = load_any(confined(req.path, self.sandbox, "model path"), req.memory_mb)
        except (ServingError, TrainingError) as exc:
            raise RequestError(400, str(exc)) from exc
        self._serve(trained, job, req.path)
        return self.model_info()

    def bench_collectives(self, req: p.CollectiveBenchRequest) -> p.CollectiveBenchReply:
        from workers.group import bench_collectives

        if self.sink is not None and self.sink.snapshot(1 << 62).state in p.BUSY_JOB_STATES:
            raise RequestError(409, "a training job is running on this node; benchmark the links after it")
        results = self._on_dist_thread(lambda: bench_collectives(self.membership.require(req.generation), req), 300)
        return p.CollectiveBenchReply(results=results)

    def leave(self) -> p.LeaveReply:
        self._on_dist_thread(self.membership.leave, 30)
        return p.LeaveReply(left=True)

    def _on_dist_thread(self, fn: Callable[[], Any], timeout: float) -> Any:
        from workers.group import GroupError

        future = self.dist_thread.submit(fn)
        try:
            return future.result(timeout=timeout)
        except GroupError as exc:
            raise RequestError(409, str(exc)) from exc
        except TimeoutError as exc:
            raise RequestError(504, f"the operation did not finish within {timeout:.0f} s") from exc

    def close(self) -> None:
        self.stopping.set()
        if self.telemetry is not None:
            self.telemetry.stop()
        self.stop_flag.set()  # a running job ends at its next stop check
        try:
            self.dist_thread.submit(self.membership.leave).result(timeout=10)
        except Exception:
            log.warning("leaving the process group at shutdown failed", exc_info=True)
        self.dist_thread.shutdown(wait=False, cancel_futures=True)


def make_handler(agent: NodeAgent, token: str, on_shutdown: Callable[[], None]) -> type:
    """The request handler class: routes every endpoint of ``workers.api.NODE_API`` to the agent
    method of its name (``shutdown`` to ``on_shutdown``)."""

    def shutdown() -> p.ShutdownReply:
        on_shutdown()
        return p.ShutdownReply(stopping=True)

    routes: dict[tuple[str, str], tuple[api.Endpoint[Any], Callable[..., Any]]] = {
        (ep.method, ep.path): (ep, shutdown if ep is api.SHUTDOWN else getattr(agent, ep.name))
        for ep in api.NODE_API
    }

    class Handler(JSONRequestHandler):
        node_id = agent.node_id

        def respond(self, method: str) -> None:
            self._check_token()  # from the headers alone: an unauthenticated body is never read
            target = urlsplit(self.path)
            route = routes.get((method, target.path))
            if route is None:
                raise RequestError(404, f"no endpoint {method} {target.path}")
            endpoint, serve = route
            body = self.read_body(required=endpoint.request is not None)
            try:
                if endpoint.request is not None:
                    result = serve(endpoint.request.model_validate_json(body or b"{}"))
                else:
                    result = serve(**_int_params(target.query, endpoint.query))
            except ValidationError as exc:
                raise RequestError(400, f"invalid request: {exc.errors(include_url=False)}") from exc
            payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
            self.reply_json(200, payload)

        def _check_token(self) -> None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise RequestError(401, "missing or wrong cluster token")

    return Handler


def _int_params(query: str, names: tuple[str, ...]) -> dict[str, int]:
    """The named integer parameters of a query string; an absent one is 0."""
    given = parse_qs(query, keep_blank_values=True)
    params: dict[str, int] = {}
    for name in names:
        try:
            params[name] = int(given.get(name, ["0"])[0])
        except ValueError as exc:
            raise RequestError(400, f"query parameter {name} must be an integer") from exc
    return params


def write_ready_file(sandbox: Path, port: int) -> None:
    tmp = sandbox / (p.READY_FILE + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    tmp.replace(sandbox / p.READY_FILE)  # atomic: the launcher never reads half a file


def serve(args: argparse.Namespace) -> int:
    token = os.environ.get(p.TOKEN_ENV)
    if not token:
        log.error("no cluster token: set %s in the environment", p.TOKEN_ENV)
        return 2
    os.environ.pop(p.TOKEN_ENV, None)  # child processes need not inherit it
    sandbox = Path(args.sandbox).resolve()
    sandbox.mkdir(parents=True, exist_ok=True)
    roots = paths.configure(sandbox, args.allowed_root)  # every client-named path stays inside these
    agent = NodeAgent(args.node_id, args.cluster_id, args.role, sandbox, args.threads, host=args.host)
    httpd: BoundedHTTPServer | None = None

    def shutdown() -> None:
        # Answer the current request first, then stop serving from another thread.
        threading.Thread(target=lambda: httpd and httpd.shutdown(), daemon=True).start()

    def lease_expired(reason: str) -> None:
        log.warning("node %s stops itself: %s", args.node_id, reason)
        shutdown()

    agent.telemetry = TelemetryPusher(agent, args.cluster_id, args.node_id, token, on_expired=lease_expired)
    httpd = BoundedHTTPServer((args.host, args.port), make_handler(agent, token, shutdown))
    signal.signal(signal.SIGTERM, lambda *_: shutdown())
    write_ready_file(sandbox, httpd.server_address[1])
    log.info(
        "node %s (%s) of cluster %s listening on %s:%d, pid %d; paths allowed: the sandbox%s",
        args.node_id, args.role, args.cluster_id, args.host, httpd.server_address[1], os.getpid(),
        "".join(f", {r}" for r in roots.extra),
    )
    if args.controller_url:
        agent.telemetry.point_to(p.LeaseRequest(controller_url=args.controller_url).controller_url)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        agent.close()
        httpd.server_close()
        log.info("node %s stopped", args.node_id)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.agent", description=__doc__)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--cluster-id", required=True)
    ap.add_argument("--role", default="worker", choices=p.ROLES)
    ap.add_argument("--sandbox", required=True, help="the node's own directory: data, checkpoints, log")
    ap.add_argument("--host", default="127.0.0.1", help="address of the control API (loopback by default)")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per co-located node)")
    ap.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                    help="a directory outside the sandbox whose files clients may name (datasets, models, "
                         "exports, checkpoints); repeatable. Without one, only the sandbox")
    ap.add_argument("--controller-url", default=None, metavar="URL",
                    help="the controller to push telemetry to (http://host:port); the node then holds a lease on "
                         "it and stops itself after FLOW_NEXUS_LEASE_GRACE_S seconds (default 120) without it while "
                         "idle. Without one: no telemetry, no lease")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Log to stderr, serve until shut down; returns the exit code.

    The caller must end the process with ``os._exit(code)`` (``main`` and the warm spawner's
    forked child both do): the dist thread may still sit in a collective with a dead peer,
    and a normal interpreter exit would wait for it.
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # a forked node drops the handlers it inherited from the spawner
    )
    lower_cpu_priority(priority_from_environment())
    code = serve(args)
    logging.shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    code = run(parse_args(argv))
    # The dist thread may still sit in a collective with a dead peer: do not wait for it.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

