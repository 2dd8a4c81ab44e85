"""Serving from the cluster: distributed prediction, benchmarks, export and load.

Every figure is measured: node-side latency by the node, end-to-end latency by this server
around the real calls, accuracy against the labels the caller sent (or the held-out split).
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flow_nexus_server import replies as r
from flow_nexus_server.launchers import NodeSpec
from flow_nexus_server.service.budget import node_memory_mb
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.errors import NextStep, NotFound, ServiceError
from flow_nexus_server.service.node_client import NodeClient, NodeRequestError
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.paths import sandbox_path, under_allowed_root
from flow_nexus_server.service.prediction import classification_report, combine, shard_indices
from flow_nexus_server.store import Checkpoint, Cluster, Node, Store
from workers import protocol as p

log = logging.getLogger(__name__)

MAX_EXAMPLES_SHOWN = 100
INPUT_KEYS = ("inputs", "input", "data", "X", "x", "features", "text", "texts")
LABEL_KEYS = ("labels", "label", "y", "targets", "target")


def parse_input_data(input_data: str, roots: list[Path], sandboxes: list[Path] | None = None) -> Any:
    """JSON text -> its value; a path to a .json/.jsonl/.csv/.txt file -> examples; other text -> itself.
    A file path is a host file under ``roots`` or, outside them (``/data/test.json`` as the guides
    write it) or relative, that path inside one of ``sandboxes`` (the first that holds it)."""
    text = input_data.strip()
    if text[:1] in "{[\"" or text in ("null", "true", "false") or _is_number(text):
        try:
            return loads_json(text, "input_data")
        except ServiceError:
            if text[:1] in "{[":
                raise
    if "\n" not in text and len(text) < 4096 and text.endswith((".json", ".jsonl", ".csv", ".txt")):
        return _read_examples(example_file(text, roots, sandboxes or []))
    return input_data  # raw text for a text model


def example_file(text: str, roots: list[Path], sandboxes: list[Path]) -> Path:
    """Where the examples file ``text`` names is: a host path under ``roots`` wins; else the same path
    inside the first sandbox holding it."""
    if Path(text).is_absolute() and sandbox_path(text, roots) is None:
        path = under_allowed_root(text, roots, "input_data file")
        if not path.is_file():
            raise ServiceError(f"input_data file {path} does not exist")
        return path
    relative = text.lstrip("/")
    if ".." in Path(relative).parts:
        raise ServiceError(f"input_data file {text!r} may not contain '..'")
    for sandbox in sandboxes:
        root = sandbox.resolve()
        candidate = (root / relative).resolve()
        if root in candidate.parents and candidate.is_file():
            return candidate
    raise ServiceError(f"input_data file {text} is outside the allowed roots ({', '.join(map(str, roots))}) "
                       "and in no sandbox of this cluster's nodes",
                       next_step=NextStep.UPLOAD)


MAX_JSON_DEPTH = 32  # examples need a few levels: a batch of images is batch, channel, row, column


def loads_json(text: str, what: str) -> Any:
    """``json.loads`` whose failures are sentences: broken JSON, or nesting deeper than
    MAX_JSON_DEPTH (which the requests to the nodes could not carry) or Python's parser follows."""
    try:
        value = json.loads(text)
        too_deep = _deeper_than(value, MAX_JSON_DEPTH)
    except json.JSONDecodeError as exc:
        raise ServiceError(f"{what} looks like JSON but does not parse: {exc}") from exc
    except RecursionError:
        too_deep = True
    if too_deep:
        raise ServiceError(f"{what} is JSON nested more than {MAX_JSON_DEPTH} levels deep; examples need a few "
                           "levels (a batch of vectors is [[1, 2], [3, 4]])")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _numbers(row: dict[str, Any], columns: list[str], path: Path) -> list[float]:
    """One CSV row's feature columns as numbers; a sentence naming the cell otherwise."""
    try:
        return [float(row[c]) for c in columns]
    except (TypeError, ValueError):
        bad = next(c for c in columns if not _is_number(str(row[c])))
        raise ServiceError(f"input_data file {path}: column {bad!r} holds {row[bad]!r}, not a number; feature "
                           "columns must be numeric (a 'text' column holds text examples)") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_examples(path: Path) -> Any:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        value = loads_json(raw, f"input_data file {path}")
        records = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        return _records_as_examples(value) if records else value  # an array of records reads like JSONL
    if path.suffix == ".jsonl":
        return _records_as_examples([loads_json(line, f"line {i} of input_data file {path}")
                                     for i, line in enumerate(raw.splitlines(), 1) if line.strip()])
    if path.suffix == ".csv":
        import csv

        rows = list(csv.DictReader(raw.splitlines()))
        if not rows:
            raise ServiceError(f"{path} has no rows")
        cols = list(rows[0])
        label = next((c for c in cols if c.lower() in LABEL_KEYS + ("class",)), None)
        text = next((c for c in cols if c.lower() == "text"), None)
        feats = [c for c in cols if c not in (label, text)]
        inputs = [row[text] for row in rows] if text else [_numbers(row, feats, path) for row in rows]
        return {"inputs": inputs, "labels": [row[label] for row in rows]} if label else inputs
    return [line for line in raw.splitlines() if line.strip()]


def _records_as_examples(rows: list[Any]) -> Any:
    """Records ({"text": ..., "label": ...}) as inputs, with their labels when every record has one."""
    objects = [row if isinstance(row, dict) else {} for row in rows]  # other lines are inputs as they are
    inputs = [next((obj[k] for k in INPUT_KEYS if k in obj), row) for obj, row in zip(objects, rows)]
    labels = [next((obj[k] for k in LABEL_KEYS if k in obj), None) for obj in objects]
    return {"inputs": inputs, "labels": labels} if all(v is not None for v in labels) else inputs


def _may_be_text(payload: Any) -> bool:
    """Whether a parsed input holds text anywhere near its top (a prompt or a text example)."""
    if isinstance(payload, str):
        return True
    if isinstance(payload, dict):
        return any(_may_be_text(v) for v in payload.values())
    return isinstance(payload, list) and bool(payload) and _may_be_text(payload[0])


def split_examples(payload: Any) -> tuple[list[Any], list[Any] | None, bool]:
    """(examples, labels, was_batch) for shard mode, which must cut the batch itself."""
    labels = None
    if isinstance(payload, dict):
        key = next((k for k in INPUT_KEYS if k in payload), None)
        if key is None:
            raise ServiceError(f"input_data object needs one of the keys {', '.join(INPUT_KEYS)}")
        lkey = next((k for k in LABEL_KEYS if k in payload), None)
        labels = payload[lkey] if lkey else None
        payload = payload[key]
    if not isinstance(payload, list):
        return [payload], labels if labels is None else [labels], False
    return payload, labels, True


def set_serving_release(store: Store, cluster_id: str, release: dict[str, str] | None) -> None:
    """Record which registry release the cluster's nodes hold (None: a model from elsewhere), so
    predictions can name it."""
    cluster = store.cluster(cluster_id)
    if cluster is None or (cluster.options or {}).get("serving_release") == release:
        return
    options = {k: v for k, v in (cluster.options or {}).items() if k != "serving_release"}
    store.update(Cluster, cluster_id, options={**options, **({"serving_release": release} if release else {})})


def release_label(cluster: Cluster) -> str | None:
    release = (cluster.options or {}).get("serving_release")
    return f"{release['name']}@{release['version']}" if release else None


class InferenceService:
    def __init__(self, clusters: ClusterService) -> None:
        self.clusters = clusters
        # Called with (cluster id, server-measured ms, failed) after each classification prediction.
        self.observers: list[Callable[[str, float, bool], None]] = []

    def _observe(self, cluster_id: str, latency_ms: float, failed: bool) -> None:
        for observer in self.observers:
            try:
                observer(cluster_id, latency_ms, failed)
            except Exception:  # an observer's failure never fails the prediction
                log.exception("a prediction observer failed on %s", cluster_id)

    # ---------------------------------------------------------------- helpers
    def inference_nodes(self, cluster_id: str) -> tuple[Cluster, list[Node]]:
        """The cluster and its running nodes with the 'inference' capability (at least one)."""
        cluster = self.clusters.get_cluster(cluster_id)
        nodes = [n for n in self.clusters.store.nodes(cluster_id) if "inference" in n.capabilities]
        if not nodes:
            raise ServiceError(f"cluster {cluster_id} has no running node with the 'inference' capability",
                               next_step=NextStep.DEPLOY_INFERENCE)
        return cluster, nodes

    def serving_nodes(self, cluster_id: str) -> tuple[Cluster, list[Node], list[p.ModelInfo]]:
        """The inference nodes that hold a model, with what each holds; when none does, the other nodes
        that hold one (a cluster whose capabilities name no model holder 'inference')."""
        svc = self.clusters
        cluster, nodes = self.inference_nodes(cluster_id)
        infos = parallel(lambda n: svc.client(cluster, n).model_info(), nodes)
        ready = [(n, i) for n, i in zip(nodes, infos) if isinstance(i, p.ModelInfo) and i.loaded]
        if not ready:  # e.g. the guides' workers list capabilities without 'inference': the model holders answer
            others = [n for n in svc.store.nodes(cluster_id) if n.id not in {x.id for x in nodes}]
            infos = parallel(lambda n: svc.client(cluster, n).model_info(), others)
            ready = [(n, i) for n, i in zip(others, infos) if isinstance(i, p.ModelInfo) and i.loaded]
        if not ready:
            raise ServiceError(f"no node of cluster {cluster_id} holds a model yet", next_step=NextStep.TRAIN_OR_LOAD)
        return cluster, [n for n, _ in ready], [i for _, i in ready]

    def sandboxes(self, cluster_id: str) -> list[Path]:
        """The cluster's node sandboxes where an examples file may lie: aggregators' first (the guides
        place a test file there), then the others."""
        nodes = sorted(self.clusters.store.nodes(cluster_id), key=lambda n: (n.role != "aggregator", n.id))
        return [Path(n.sandbox) for n in nodes if n.sandbox]

    def quantized_default(self, cluster: Cluster) -> bool:
        q = cluster.options.get("quantization") or {}
        return bool(q.get("enabled"))

    # ---------------------------------------------------------------- predict
    def predict(self, cluster_id: str, input_data: str, aggregation: str, mode: str, model: str,
                quantized: bool | None, generation: p.GenerationOptions | None = None) -> r.PredictReply:
        payload = parse_input_data(input_data, self.clusters.settings.allowed_roots, self.sandboxes(cluster_id))
        svc = self.clusters
        if _may_be_text(payload):  # only text can be a language model's prompt
            cluster, nodes, infos = self.serving_nodes(cluster_id)
            if any(i.kind == "lm" for i in infos):
                from flow_nexus_server.service import generation as g

                lm = [n for n, i in zip(nodes, infos) if i.kind == "lm"]
                return g.generate([svc.client(cluster, n) for n in lm], [n.id for n in lm], g.prompts_of(payload),
                                  aggregation, mode, generation or p.GenerationOptions(), model == "local", cluster_id)
        cluster, nodes = self.inference_nodes(cluster_id)
        use_int8 = self.quantized_default(cluster) if quantized is None else quantized
        use_local = model == "local"
        start = time.perf_counter()
        if mode == "shard":
            # Shard mode cuts the batch, so it must know which nodes hold a model first.
            cluster, nodes, _ = self.serving_nodes(cluster_id)
            examples, labels, _ = split_examples(payload)
            cuts = [s for s in shard_indices(len(examples), len(nodes)) if s.stop > s.start]
            jobs = [(nodes[i], {"inputs": examples[c], **({"labels": labels[c]} if labels else {})})
                    for i, c in enumerate(cuts)]
        else:
            jobs = [(n, payload) for n in nodes]

        def ask(job: tuple[Node, Any]) -> tuple[p.PredictReply, float]:
            node, inputs = job
            t0 = time.perf_counter()
            reply = svc.client(cluster, node).predict(
                p.PredictRequest(inputs=inputs, use_local=use_local, quantized=use_int8))
            return reply, (time.perf_counter() - t0) * 1000

        answers = parallel(ask, jobs)
        total_ms = (time.perf_counter() - start) * 1000
        # Nodes that hold no model yet answer 409 and sit this one out.
        empty = [a for a in answers if isinstance(a, NodeRequestError) and a.status == 409]
        answers = [a for a in answers if not (isinstance(a, NodeRequestError) and a.status == 409)]
        if not answers:
            raise ServiceError(f"no node of cluster {cluster_id} holds a model yet", next_step=NextStep.TRAIN_OR_LOAD)
        if mode == "shard" and empty:
            raise ServiceError("a node lost its model during the prediction; try again")
        errors = [a for a in answers if isinstance(a, BaseException)]
        if errors:
            bad = errors[0]
            if isinstance(bad, NodeRequestError) and bad.status == 400:
                raise ServiceError(f"the input does not fit the model: {str(bad).split(': ', 1)[-1]}")
            self._observe(cluster_id, total_ms, True)
            raise ServiceError("prediction failed: " + "; ".join(map(str, errors)))
        if model == "local" and not any(a[0].model == "local" for a in answers):  # type: ignore[index]
            raise ServiceError("no node holds a local (pre-aggregation) model; those exist after federated "
                               "training; use model='global'")
        replies = [a[0] for a in answers]  # type: ignore[index]
        names = replies[0].label_names
        per_node = [r.NodePrediction(node_id=rep.node_id, prediction=None, confidence=0.0, latency_ms=rep.latency_ms,
                                     round_trip_ms=a[1], model=rep.model, examples=len(rep.probabilities))  # type: ignore[index]
                    for rep, a in zip(replies, answers)]
        if mode == "shard":
            probs = np.concatenate([np.asarray(rep.probabilities) for rep in replies])
            combined = combine([probs], "mean")
            labels_idx = sum((rep.labels or [] for rep in replies), []) if all(rep.labels for rep in replies) else None
            method = "shard"
        else:
            combined = combine([np.asarray(rep.probabilities) for rep in replies], aggregation)  # type: ignore[arg-type]
            labels_idx = replies[0].labels
            method = aggregation
        for node, rep in zip(per_node, replies):
            votes = np.asarray(rep.probabilities)
            idx = votes.argmax(1)
            node.prediction = [names[i] for i in idx[:MAX_EXAMPLES_SHOWN]] if len(idx) > 1 else names[int(idx[0])]
            node.confidence = float(votes.max(1).mean())
        examples = combined.examples(names, [rep.node_id for rep in replies] if mode != "shard" else None)
        pred_names = [names[int(i)] for i in combined.predictions]
        report = classification_report(labels_idx, [int(i) for i in combined.predictions], names) \
            if labels_idx is not None else None
        self._observe(cluster_id, total_ms, False)
        return r.PredictReply(
            success=True, cluster_id=cluster_id, prediction=pred_names[0] if len(pred_names) == 1 else pred_names,
            confidence=float(np.mean(combined.confidence)), aggregation_method=method, mode=mode,
            model="int8" if use_int8 else model, nodes_used=len(replies), examples=len(pred_names),
            individual_predictions=per_node, details=examples[:MAX_EXAMPLES_SHOWN],
            details_truncated=len(examples) > MAX_EXAMPLES_SHOWN, total_latency_ms=total_ms,
            release=release_label(cluster),
            metrics=r.ClassificationMetrics(**report, precision=report["macro_precision"],
                                            recall=report["macro_recall"], f1_score=report["macro_f1"])
            if report else None,
        )

    # ------------------------------------------------------------- benchmark
    def benchmark(self, model_id: str, benchmark_type: str, input_data: str | None, runs: int,
                  quantized: bool | None) -> r.BenchmarkResult:
        payload = parse_input_data(input_data, self.clusters.settings.allowed_roots) if input_data else None
        if model_id.startswith("ckpt_"):
            path = self.checkpoint_path(model_id)
            with self.scratch_node() as client:
                client.load_model(p.LoadRequest(path=str(path)))
                node = client.benchmark(p.BenchmarkRequest(inputs=payload, runs=runs, quantized=bool(quantized)))
            return r.BenchmarkResult(success=True, model_id=model_id, benchmark_type=benchmark_type,
                                     results=self._summary([node], None), nodes=[node.model_dump()],
                                     timestamp=time.time())
        cluster, nodes, infos = self.serving_nodes(model_id)
        use_int8 = self.quantized_default(cluster) if quantized is None else quantized
        per_node: list[p.BenchmarkReply] = []
        if benchmark_type in ("inference", "memory", "throughput", "comprehensive"):
            for node in nodes:  # one at a time: co-located nodes would disturb each other's timings
                per_node.append(self.clusters.client(cluster, node).benchmark(
                    p.BenchmarkRequest(inputs=payload, runs=runs, quantized=use_int8)))
        e2e = None
        lm = any(i.kind == "lm" for i in infos)
        if benchmark_type in ("inference", "comprehensive") and payload is not None and not lm:
            e2e = self.end_to_end_latency(model_id, payload, runs)
        summary = self._summary(per_node, e2e)
        if lm and benchmark_type in ("inference", "throughput", "comprehensive"):
            summary.update(self.cluster_generation(model_id, payload))
        if benchmark_type in ("throughput", "comprehensive"):
            summary["training_samples_per_second"] = self.last_training_throughput(model_id)
        return r.BenchmarkResult(success=True, model_id=model_id, benchmark_type=benchmark_type, results=summary,
                                 nodes=[n.model_dump() for n in per_node], end_to_end=e2e, timestamp=time.time())

    def end_to_end_latency(self, cluster_id: str, payload: Any, runs: int) -> r.LatencyStats:
        """Single-example predictions through every serving node along the full service path
        (store look-ups, node calls, combining), timed by the server; only the MCP transport is left out."""
        examples, _, _ = split_examples(payload)
        one = json.dumps(examples[0])
        nodes = 0
        for _ in range(3):
            nodes = self.predict(cluster_id, one, "mean", "replicate", "global", False).nodes_used
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.predict(cluster_id, one, "mean", "replicate", "global", False)
            times.append((time.perf_counter() - t0) * 1000)
        return latency_stats(times, nodes)

    def cluster_generation(self, cluster_id: str, payload: Any) -> dict[str, Any]:
        """Greedy ensemble decoding of one prompt through every serving node, timed by the server."""
        from flow_nexus_server.service.generation import prompts_of

        prompt = prompts_of(payload)[0] if payload is not None else "The"
        self.predict(cluster_id, json.dumps({"text": prompt}), "ensemble", "replicate", "global", False,
                     p.GenerationOptions(max_new_tokens=8))  # warm-up
        reply = self.predict(cluster_id, json.dumps({"text": prompt}), "ensemble", "replicate", "global", False,
                             p.GenerationOptions(max_new_tokens=32))
        d = reply.details[0]
        return {"cluster_tokens_per_second": d["tokens_per_second"], "cluster_first_token_ms": d["first_token_ms"],
                "cluster_new_tokens": d["new_tokens"], "cluster_nodes": reply.nodes_used}

    @staticmethod
    def _summary(nodes: list[p.BenchmarkReply], e2e: r.LatencyStats | None) -> dict[str, Any]:
        if not nodes:
            return {}
        first = nodes[0]
        out: dict[str, Any] = {
            "latency_p50": e2e.p50_ms if e2e else first.latency_p50_ms,
            "latency_p95": e2e.p95_ms if e2e else first.latency_p95_ms,
            "latency_p99": e2e.p99_ms if e2e else first.latency_p99_ms,
            "node_latency_p50": statistics.median(n.latency_p50_ms for n in nodes),
            "samples_per_second": sum(n.samples_per_second for n in nodes),
            "model_size_mb": first.model_size_mb, "parameters": first.parameters,
            "peak_memory_mb": max(n.peak_rss_mb for n in nodes),
        }
        if first.accuracy is not None:
            out["accuracy"] = first.accuracy
        if first.int8:
            out["int8"] = first.int8
        gens = [n.generation for n in nodes if n.generation]
        if gens:  # a language model: the figures of generation, median over the nodes
            for key in ("tokens_per_second", "token_latency_p50_ms", "token_latency_p95_ms", "first_token_ms",
                        "prompt_tokens_per_second"):
                out[key] = statistics.median(g[key] for g in gens)
            out["samples_per_second"] = out["tokens_per_second"]
        return out

    def last_training_throughput(self, cluster_id: str) -> float | None:
        from sqlalchemy import select

        from flow_nexus_server.store import TrainingSession

        with self.clusters.store.session() as s:
            row = s.scalars(select(TrainingSession).where(TrainingSession.cluster_id == cluster_id)
                            .order_by(TrainingSession.created_at.desc())).first()
        return (row.final_metrics or {}).get("samples_per_s") if row else None

    # ------------------------------------------------------- export / load
    def checkpoint_path(self, checkpoint_id: str) -> Path:
        with self.clusters.store.session() as s:
            ck = s.get(Checkpoint, checkpoint_id)
        if ck is None:
            raise NotFound(f"checkpoint {checkpoint_id!r} does not exist", next_step=NextStep.LIST_CHECKPOINTS)
        if not Path(ck.path).exists():
            raise ServiceError(f"checkpoint {checkpoint_id} was deleted from disk ({ck.path})")
        return Path(ck.path)

    def export(self, model_id: str, fmt: str, destination: str | None) -> r.ExportReply:
        settings = self.clusters.settings
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = under_allowed_root(destination, settings.allowed_roots, "destination") if destination else \
            settings.home / "exports" / f"{model_id}-{fmt}-{stamp}-{secrets.token_hex(2)}"
        existing = next(d for d in (target, *target.parents) if d.exists())
        if not existing.is_dir():
            where = "is a file" if existing == target else f"lies under the file {existing}"
            raise ServiceError(f"destination {target} {where}; name a new or empty directory for the export")
        if target.exists() and any(target.iterdir()):
            raise ServiceError(f"destination {target} is not empty; choose a new directory")
        card = {"exported_from": model_id}
        if model_id.startswith("ckpt_"):
            with self.scratch_node() as client:
                client.load_model(p.LoadRequest(path=str(self.checkpoint_path(model_id))))
                out = client.export_model(p.ExportRequest(directory=str(target), format=fmt, card=card))
        else:
            cluster, nodes, infos = self.serving_nodes(model_id)
            node = next((n for n in nodes if n.role == "aggregator"), nodes[0])
            out = self.clusters.client(cluster, node).export_model(p.ExportRequest(directory=str(target), format=fmt,
                                                                                   card=card))
        self.clusters.store.add_event(model_id if not model_id.startswith("ckpt_") else "-", "model_exported",
                                      f"{fmt} export to {target}")
        return r.ExportReply(success=True, model_id=model_id, format=fmt, directory=out.directory, files=out.files,
                             bytes=out.bytes)

    def final_export(self, cluster_id: str) -> r.ExportReply | None:
        """The model a cluster serves, exported in the pytorch format before the cluster stops (its
        final artifact); None when no node holds a model. A failure is logged, never stops the terminate."""
        try:
            self.serving_nodes(cluster_id)
        except ServiceError:
            return None
        try:
            return self.export(cluster_id, "pytorch", None)
        except Exception:
            log.exception("exporting the final model of %s failed", cluster_id)
            return None

    def load(self, cluster_id: str, path: str) -> r.LoadReply:
        settings = self.clusters.settings
        source = self.checkpoint_path(path) if path.startswith("ckpt_") else \
            under_allowed_root(path, settings.allowed_roots, "path")
        cluster, nodes = self.inference_nodes(cluster_id)
        results = parallel(lambda n: self.clusters.client(cluster, n).load_model(
            p.LoadRequest(path=str(source), memory_mb=node_memory_mb(n, settings))), nodes)
        errors = [f"{n.id}: {e}" for n, e in zip(nodes, results) if isinstance(e, BaseException)]
        if errors:
            raise ServiceError("loading the model failed on " + "; ".join(errors))
        info = results[0]
        set_serving_release(self.clusters.store, cluster_id, None)
        self.clusters.event(cluster_id, "model_loaded", f"{source} loaded on {len(nodes)} node(s)")
        return r.LoadReply(success=True, cluster_id=cluster_id, source=str(source), nodes_loaded=len(nodes),
                           model=info.model_dump())  # type: ignore[union-attr]

    @contextmanager
    def scratch_node(self) -> Iterator[NodeClient]:
        """A temporary node outside any cluster, for work on a checkpoint alone."""
        svc = self.clusters
        node_id = "node_" + secrets.token_hex(4)
        token = secrets.token_hex(32)
        sandbox = svc.settings.home / "scratch" / node_id
        launcher = svc.launchers["subprocess"]
        spec = NodeSpec(node_id, "scratch", "worker", sandbox, token, allowed_roots=tuple(svc.settings.allowed_roots))
        handle = launcher.launch(spec, svc.settings.node_start_timeout_s)
        try:
            yield NodeClient(node_id, handle.host, handle.port, token)
        finally:
            launcher.terminate(handle, grace_s=2)


def latency_stats(times_ms: list[float], nodes: int) -> r.LatencyStats:
    arr = np.asarray(times_ms)
    return r.LatencyStats(p50_ms=float(np.percentile(arr, 50)), p95_ms=float(np.percentile(arr, 95)),
                          p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()), runs=len(times_ms),
                          nodes=nodes)
