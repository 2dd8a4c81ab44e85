"""The canonical evaluation every release gets, whichever site trained it: quality (accuracy,
macro F1), latency p50/p95 through a serving cluster, size, and robustness (quality under one
fixed input perturbation: Gaussian noise for features and images, character typos for text).

The examples come from a built-in dataset's held-out split (validation 20%, seed 0: the split
training leaves out by default) or from a file / inline JSON with labels, as predictions take them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.inference import InferenceService, parse_input_data, split_examples
from workers.protocol import BUILTIN_DATASETS

NOISE_FRACTION = 0.5  # Gaussian noise sigma as a fraction of the eval inputs' standard deviation
TYPO_RATE = 0.1  # chance that a word of 4+ letters gets two neighbouring letters swapped
PERTURBATION_SEED = 0
LATENCY_RUNS = 30
MAX_EVAL_EXAMPLES = 2000  # one prediction request carries them all


@dataclass
class EvalSet:
    inputs: list[Any]
    labels: list[Any]
    text: bool


def load_eval_set(dataset: str, roots: list[Path], split: str = "validation") -> EvalSet:
    """A built-in dataset's held-out split (``split="train"``: the rest, a distillation's transfer set),
    or examples with labels from a file or inline JSON."""
    if dataset in BUILTIN_DATASETS:
        from workers.data import load_dataset, train_val_split  # server-side read of the shipped files

        ds = load_dataset(dataset)
        if ds.y is None:
            raise ServiceError(f"{dataset} is a language-model corpus; the registry evaluates classifiers "
                               "(perplexity is not measured yet)")
        train, val = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
        sub = ds.subset((val if split == "validation" else train)[:MAX_EVAL_EXAMPLES])
        X = sub.X.tolist() if isinstance(sub.X, np.ndarray) else list(sub.X)
        names = ds.label_names
        return EvalSet(X, [names[int(i)] for i in sub.y], ds.kind == "text")
    payload = parse_input_data(dataset, roots)
    inputs, labels, batch = split_examples(payload) if isinstance(payload, (dict, list)) else ([], None, False)
    if not batch or labels is None or len(labels) != len(inputs) or not inputs:
        raise ServiceError("dataset must be a built-in dataset name or examples with labels: a .json/.jsonl/.csv "
                           "file under the allowed roots or inline JSON {\"inputs\": [...], \"labels\": [...]}")
    if len(inputs) > MAX_EVAL_EXAMPLES:
        raise ServiceError(f"dataset has {len(inputs)} examples; the evaluation takes at most {MAX_EVAL_EXAMPLES}")
    return EvalSet(list(inputs), list(labels), isinstance(inputs[0], str))


def perturb(data: EvalSet) -> EvalSet:
    """The fixed perturbation (same seed every time, so every release faces the same inputs)."""
    if data.text:
        rng = random.Random(PERTURBATION_SEED)
        return EvalSet([_typos(t, rng) for t in data.inputs], data.labels, True)
    arr = np.asarray(data.inputs, dtype=np.float64)
    sigma = NOISE_FRACTION * float(arr.std())
    noisy = arr + np.random.default_rng(PERTURBATION_SEED).normal(0.0, sigma, arr.shape)
    return EvalSet(np.round(noisy, 4).tolist(), data.labels, False)


def _typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 4 and rng.random() < TYPO_RATE:
            j = rng.randrange(len(word) - 1)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return " ".join(words)


def _quality(inference: InferenceService, cluster_id: str, data: EvalSet) -> dict[str, Any]:
    reply = inference.predict(cluster_id, json.dumps({"inputs": data.inputs, "labels": data.labels}), "mean",
                              "replicate", "global", False)
    confidences = [reply.confidence, *(n.confidence for n in reply.individual_predictions)]
    if reply.metrics is None:
        raise ServiceError("the serving cluster answered without metrics; the dataset's labels were not read")
    return {"accuracy": reply.metrics.accuracy, "macro_f1": reply.metrics.macro_f1,
            "finite": all(math.isfinite(c) for c in confidences), "nodes": reply.nodes_used}


def evaluate(inference: InferenceService, cluster_id: str, data: EvalSet, dataset: str) -> dict[str, Any]:
    """The report of the model the cluster serves now (every figure measured here)."""
    clean = _quality(inference, cluster_id, data)
    noisy = _quality(inference, cluster_id, perturb(data))
    latency = inference.end_to_end_latency(cluster_id, data.inputs[:1], LATENCY_RUNS)
    _, _, infos = inference.serving_nodes(cluster_id)
    by_source = {i.source: i for i in infos}  # an ensemble's parents count once each
    return {
        "dataset": dataset, "examples": len(data.inputs),
        "accuracy": clean["accuracy"], "macro_f1": clean["macro_f1"],
        "latency_p50_ms": latency.p50_ms, "latency_p95_ms": latency.p95_ms, "latency_runs": latency.runs,
        "size_mb": sum(i.size_mb for i in by_source.values()),
        "parameters": sum(i.parameters for i in by_source.values()),
        "robustness": noisy["accuracy"],
        "perturbation": (f"character typos (rate {TYPO_RATE}, seed {PERTURBATION_SEED})" if data.text else
                         f"Gaussian noise (sigma {NOISE_FRACTION} x input std, seed {PERTURBATION_SEED})"),
        "nan_outputs": not (clean["finite"] and noisy["finite"]),
        "serving_nodes": clean["nodes"],
    }
