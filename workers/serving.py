"""What a node does with the model it holds: export it, load one, measure it, find held-out data.

Export layout (a directory): ``config.json`` (architecture, preset, task, labels, training
facts), ``tokenizer.json`` for text models, ``labels.json``, the weights as
``model.safetensors`` or ``model.torchscript.pt``, and ``README.md`` (a model card with the
metrics the model was trained to).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.data import Tokenizer, load_dataset, train_val_split
from workers.inference import InferenceError, model_size_bytes
from workers.models import TaskInfo, build_model, describe_model
from workers.training.checkpoint import load_checkpoint
from workers.training.common import TrainedModel

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = {"safetensors": "model.safetensors", "torchscript": "model.torchscript.pt"}


class ServingError(ValueError):
    """Export / load failed; the message is for the user."""


def example_batch(trained: TrainedModel, n: int = 1) -> torch.Tensor:
    """A batch of the model's input shape (used to trace a TorchScript export)."""
    task = trained.task
    if task.kind in ("text", "lm"):
        return torch.full((n, max(1, trained.max_len)), 2, dtype=torch.long)
    return torch.zeros((n, *task.input_shape), dtype=torch.float32)


def export_model(trained: TrainedModel, directory: Path, fmt: str, card: dict[str, Any],
                 job: dict[str, Any] | None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    model = trained.model.eval()
    files: list[Path] = []
    if fmt == "safetensors":
        from safetensors.torch import save_model

        path = directory / WEIGHTS[fmt]
        save_model(model, str(path))  # handles tied weights (LM heads)
    elif fmt == "torchscript":
        path = directory / WEIGHTS[fmt]
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(model, example_batch(trained, 2), check_trace=False)
            scripted.save(str(path))
        except Exception as exc:
            raise ServingError(f"TorchScript tracing failed for {trained.architecture}: {exc}; "
                               "export as safetensors instead") from exc
    else:
        raise ServingError(f"unknown export format {fmt!r}; use safetensors or torchscript")
    files.append(path)
    info = describe_model(model)
    config = {
        "format": fmt, "weights": path.name, "architecture": trained.architecture, "preset": trained.preset,
        "task": asdict(trained.task), "max_len": trained.max_len, "label_names": trained.label_names,
        "layers": (job or {}).get("layers"), "parameters": info["parameters"],
        "training": {k: (job or {}).get(k) for k in ("session_id", "dataset", "mode", "topology", "epochs", "rounds",
                                                     "validation_split", "seed", "optimizer", "learning_rate")},
        "metrics": trained.metrics, "exported_at": time.time(),
    }
    files.append(_write(directory / CONFIG, json.dumps(config, indent=2)))
    files.append(_write(directory / "labels.json", json.dumps(trained.label_names)))
    if trained.tokenizer is not None:
        files.append(_write(directory / "tokenizer.json", json.dumps(trained.tokenizer.to_dict())))
    files.append(_write(directory / "README.md", model_card(config, card)))
    return files


def model_card(config: dict[str, Any], card: dict[str, Any]) -> str:
    metrics = config.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    training = config.get("training") or {}
    facts = "\n".join(f"- {k}: {v}" for k, v in {**training, **card}.items() if v is not None)
    return f"""# {config['architecture']} ({config['preset']}) exported by flow-nexus-server

- format: {config['format']} (`{config['weights']}`), {config['parameters']:,} parameters
- input: {config['task']['kind']} {tuple(config['task']['input_shape'])}, max_len {config['max_len']}
- labels: {', '.join(config['label_names']) or '(language model)'}

## Trained with
{facts or '- (no training facts recorded)'}

## Metrics it was trained to (measured on the held-out split)
| metric | value |
|---|---|
{rows or '| (none recorded) | |'}

## Load it
`neural_model_load(cluster_id=..., path="<this directory>")`, then `neural_predict_distributed`.
"""


def load_export(directory: Path) -> tuple[TrainedModel, dict[str, Any]]:
    cfg_path = directory / CONFIG
    if not cfg_path.exists():
        raise ServingError(f"{directory} is not an export of this server (no {CONFIG})")
    config = json.loads(cfg_path.read_text())
    t = dict(config["task"])
    t["input_shape"] = tuple(t.get("input_shape") or ())
    task = TaskInfo(**t)
    weights = directory / config["weights"]
    if config["format"] == "torchscript":
        model = torch.jit.load(str(weights), map_location="cpu")
    else:
        from safetensors.torch import load_model

        model = build_model(config["architecture"], config["preset"], task, layers=config.get("layers"))
        load_model(model, str(weights))
    model.eval()
    tok_path = directory / "tokenizer.json"
    tokenizer = Tokenizer.from_dict(json.loads(tok_path.read_text())) if tok_path.exists() else None
    trained = TrainedModel(model=model, task=task, tokenizer=tokenizer, label_names=list(config["label_names"]),
                           architecture=config["architecture"], preset=config["preset"],
                           max_len=int(config["max_len"]), session_id=(config.get("training") or {}).get("session_id"),
                           metrics=dict(config.get("metrics") or {}), checkpoint=str(directory))
    return trained, {**(config.get("training") or {}), "layers": config.get("layers")}


def load_any(path: Path) -> tuple[TrainedModel, dict[str, Any]]:
    """An export directory or a checkpoint file -> (model, the training job facts)."""
    if path.is_dir():
        return load_export(path)
    if path.is_file():
        trained = load_checkpoint(path)
        ck = torch.load(path, map_location="cpu", weights_only=False)
        return trained, dict(ck.get("job") or {})
    raise ServingError(f"{path} is neither an export directory nor a checkpoint file on this node")


def held_out(job: dict[str, Any], sandbox: Path) -> tuple[Any, np.ndarray] | None:
    """The validation split the model was trained against (same dataset, seed and split)."""
    spec = job.get("dataset")
    if not spec:
        return None
    try:
        ds = load_dataset(spec, sandbox)
    except Exception:  # the data may have been private to another node
        log.info("held-out data of %r is not readable here", spec)
        return None
    if ds.y is None:
        return None
    _, val = train_val_split(len(ds), float(job.get("validation_split") or 0.2), int(job.get("seed") or 0),
                             stratify=ds.y)
    sub = ds.subset(val)
    return sub.X, np.asarray(sub.y)


def size_mb(model: torch.nn.Module) -> float:
    return model_size_bytes(model) / 2**20


__all__ = ["ServingError", "InferenceError", "export_model", "load_any", "held_out", "size_mb", "example_batch"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
