"""What a node does with the model it holds: export it, load one, measure it, find held-out data.

Export layout (a directory): ``config.json`` (architecture, preset, task, labels, training
facts), ``tokenizer.json`` for text models, ``labels.json``, the weights as
``model.safetensors`` (always; a TorchScript export adds ``model.torchscript.pt`` for other
programs, a pytorch export ``model.pt``: a plain state dict for ``torch.load(weights_only=True)``),
and ``README.md`` (a model card with the metrics the model was trained to).

``format="huggingface"`` (language models) writes the layout ``transformers`` loads instead
(:mod:`workers.hf_export`), and such a directory loads back, also one trained elsewhere.

Loading never runs code from the files: the model is rebuilt from ``config.json`` and its
weights read from safetensors; ``config["weights"]`` must name a file inside the export
directory. TorchScript is never loaded (``torch.jit.load`` unpickles).
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

from workers.data import load_dataset, load_tokenizer, train_val_split
from workers.data.bpe import BPETokenizer
from workers.inference import InferenceError, model_size_bytes
from workers.models import TaskInfo, build_model, describe_model
from workers.training.checkpoint import hf_config_of, model_from_checkpoint, read_checkpoint
from workers.training.common import TrainedModel

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.torchscript.pt"
PYTORCH = "model.pt"


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
    if fmt == "huggingface":
        from workers.hf_export import HuggingFaceError, export_huggingface

        try:
            return export_huggingface(trained, directory, card, job)
        except HuggingFaceError as exc:
            raise ServingError(str(exc)) from None
    if fmt not in ("safetensors", "torchscript", "pytorch"):
        raise ServingError(f"unknown export format {fmt!r}; use safetensors, torchscript, pytorch or huggingface")
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    model = trained.model.eval()
    path = directory / WEIGHTS
    save_model(model, str(path))  # handles tied weights (LM heads); what load_export reads
    files: list[Path] = [path]
    if fmt == "torchscript":
        traced = directory / TORCHSCRIPT
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(model, example_batch(trained, 2), check_trace=False)
            scripted.save(str(traced))
        except Exception as exc:
            raise ServingError(f"TorchScript tracing failed for {trained.architecture}: {exc}; "
                               "export as safetensors instead") from exc
        files.append(traced)
    if fmt == "pytorch":
        # A plain state dict of tensors: torch.load(..., weights_only=True) reads it without running code.
        state = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
        torch.save(state, str(directory / PYTORCH))
        files.append(directory / PYTORCH)
    info = describe_model(model)
    config = {
        "format": fmt, "weights": path.name, **({"torchscript": TORCHSCRIPT} if fmt == "torchscript" else {}),
        **({"pytorch": PYTORCH} if fmt == "pytorch" else {}),
        "architecture": trained.architecture, "preset": trained.preset,
        "task": asdict(trained.task), "max_len": trained.max_len, "label_names": trained.label_names,
        "layers": (job or {}).get("layers"), "hf_config": hf_config_of(model), "parameters": info["parameters"],
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
    shown = config.get("torchscript") or config.get("pytorch") or config["weights"]
    facts = "\n".join(f"- {k}: {v}" for k, v in {**training, **card}.items() if v is not None)
    return f"""# {config['architecture']} ({config['preset']}) exported by flow-nexus-server

- format: {config['format']} (`{shown}`), {config['parameters']:,} parameters
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
    if not cfg_path.is_file():
        raise ServingError(f"{directory} is not an export of this server (no {CONFIG})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        t = dict(config["task"])
        t["input_shape"] = tuple(t.get("input_shape") or ())
        task = TaskInfo(**t)
        arch, preset = config["architecture"], config["preset"]
        label_names, max_len = list(config["label_names"]), int(config["max_len"])
        training = dict(config.get("training") or {})
        tok_path = directory / "tokenizer.json"
        tokenizer = load_tokenizer(json.loads(tok_path.read_text(encoding="utf-8"))) \
            if tok_path.is_file() else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as exc:
        log.info("reading export %s failed", directory, exc_info=True)
        raise ServingError(f"{directory} is not an export this server wrote (its config.json or tokenizer.json "
                           "cannot be read); export the model again") from exc
    if task.kind == "lm" and not isinstance(tokenizer, BPETokenizer):
        raise ServingError(f"{directory} is a language model of an older version of this server (word-level "
                           "vocabulary, hand-written transformer) that it can no longer load; train it again")
    weights = export_weights(directory, config)
    from safetensors.torch import load_model

    try:
        model = build_model(arch, preset, task, layers=config.get("layers"), hf_config=config.get("hf_config"))
        load_model(model, str(weights))
    except Exception as exc:  # a foreign or damaged file: no Python text in the reply
        log.info("loading export %s failed", directory, exc_info=True)
        raise ServingError(f"the weights in {weights} do not fit the {arch} ({preset}) model its config.json "
                           "describes; export the model again") from exc
    model.eval()
    trained = TrainedModel(model=model, task=task, tokenizer=tokenizer, label_names=label_names,
                           architecture=arch, preset=preset, max_len=max_len,
                           session_id=training.get("session_id"),
                           metrics=dict(config.get("metrics") or {}), checkpoint=str(directory))
    return trained, {**training, "layers": config.get("layers")}


def export_weights(directory: Path, config: dict[str, Any]) -> Path:
    """The safetensors file ``config["weights"]`` names: a plain file name inside ``directory``."""
    name = config.get("weights")
    if config.get("format") == "torchscript" and name != WEIGHTS:
        raise ServingError(f"{directory} holds only TorchScript weights; they are not loaded because "
                           "torch.jit.load can run code. Export the model again (safetensors, or torchscript "
                           f"from this version, which adds {WEIGHTS})")
    if not isinstance(name, str) or not name.endswith(".safetensors") or name != Path(name).name \
            or "/" in name or "\\" in name or name.startswith("."):
        raise ServingError(f"config.json of {directory} names weights {name!r}; they must be a .safetensors "
                           "file name inside the export directory (no path)")
    root = directory.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise ServingError(f"config.json of {directory} names weights {name!r}, which is not a file inside the "
                           "export directory")
    return path


def load_any(path: Path, memory_mb: int | None = None) -> tuple[TrainedModel, dict[str, Any]]:
    """An export directory (this server's or a Hugging Face GPT-2 one, which must fit ``memory_mb``)
    or a checkpoint file -> (model, the training job facts)."""
    from workers.hf_export import HuggingFaceError, is_huggingface_dir, load_huggingface

    if path.is_dir() and is_huggingface_dir(path):
        try:
            return load_huggingface(path, memory_mb)
        except HuggingFaceError as exc:
            raise ServingError(str(exc)) from None
    if path.is_dir():
        return load_export(path)
    if path.is_file():
        ck = read_checkpoint(path)  # read once: no second load of the file
        return model_from_checkpoint(ck, path), dict(ck.get("job") or {})
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


def held_out_texts(job: dict[str, Any], sandbox: Path) -> list[str]:
    """The held-out texts of a language model's training data (empty when not readable here)."""
    spec = job.get("dataset")
    if not spec:
        return []
    try:
        ds = load_dataset(spec, sandbox)
    except Exception:  # the data may have been private to another node
        log.info("held-out texts of %r are not readable here", spec)
        return []
    _, val = train_val_split(len(ds), float(job.get("validation_split") or 0.2), int(job.get("seed") or 0))
    texts = [t for t in ds.subset(val).X if isinstance(t, str) and t.strip()]
    return texts


def size_mb(model: torch.nn.Module) -> float:
    return model_size_bytes(model) / 2**20


__all__ = ["ServingError", "InferenceError", "export_model", "load_any", "held_out", "size_mb", "example_batch"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
