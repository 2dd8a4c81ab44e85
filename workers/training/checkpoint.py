"""Checkpoint files: written by the reporting rank, read on resume and for inference.

A checkpoint is ``torch.save`` of a dict: ``model_state``, ``optimizer_state`` (when the
writer has one), ``job`` (``TrainJob.model_dump()``), ``task`` (``asdict(TaskInfo)``),
``tokenizer`` (``Tokenizer.to_dict()`` or None), ``label_names``, ``architecture``,
``preset``, ``max_len``, ``epoch`` (epoch or federated round), ``mode`` and ``metrics``
(the latest global metrics). Files are named ``ckpt-<session>-e<NNN>.pt``.

A raft replica's ``<sandbox>/raft/committed.pt`` has the same format (plus a ``raft`` entry:
term, version, commit index), so ``resume_from`` and :func:`load_checkpoint` accept it; its
``epoch`` is the committed round.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.data import Tokenizer
from workers.models import ModelError, TaskInfo, build_model
from workers.protocol import TrainJob

from .common import TrainedModel, TrainingError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^ckpt-(?P<session>.+)-e(?P<epoch>\d+)\.pt$")


def safe_session(session_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", session_id) or "session"


def checkpoint_dir(job: TrainJob, sandbox: Path) -> Path:
    if job.checkpoint_dir:
        d = Path(os.path.expanduser(job.checkpoint_dir))
        return d if d.is_absolute() else Path(sandbox) / d
    return Path(sandbox) / "checkpoints"


def checkpoint_name(session_id: str, epoch: int) -> str:
    return f"ckpt-{safe_session(session_id)}-e{int(epoch):03d}.pt"


def session_checkpoints(directory: Path, session_id: str) -> list[Path]:
    """This session's checkpoint files in ``directory``, oldest epoch first."""
    safe = safe_session(session_id)
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _NAME_RE.match(p.name)
            if m and m.group("session") == safe:
                found.append((int(m.group("epoch")), p))
    return [p for _, p in sorted(found)]


def checkpoint_payload(
    job: TrainJob,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    task: TaskInfo,
    tokenizer: Tokenizer | None,
    label_names: list[str],
    max_len: int,
    metrics: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The dict a checkpoint file holds (``extra`` keys are added as they are)."""
    return {
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "job": job.model_dump(),
        "task": asdict(task),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "label_names": list(label_names),
        "architecture": job.architecture,
        "preset": job.model,
        "max_len": int(max_len),
        "epoch": int(epoch),
        "mode": job.mode,
        "metrics": dict(metrics),
        **extra,
    }


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name next to ``path``, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    directory: Path,
    job: TrainJob,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    task: TaskInfo,
    tokenizer: Tokenizer | None,
    label_names: list[str],
    max_len: int,
    metrics: dict[str, float],
) -> tuple[Path, list[Path]]:
    """Write the checkpoint atomically; returns (path, files deleted by the rotation)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(job.session_id, epoch)
    write_atomic(path, checkpoint_payload(job, epoch, model, optimizer, task, tokenizer, label_names, max_len,
                                          metrics))
    removed = []
    files = session_checkpoints(directory, job.session_id)
    for old in files[: max(0, len(files) - job.max_checkpoints)]:
        try:
            old.unlink()
            removed.append(old)
        except OSError:
            log.warning("could not delete old checkpoint %s", old, exc_info=True)
    return path, removed


def resolve_resume(spec: str, sandbox: Path) -> Path:
    p = Path(os.path.expanduser(spec))
    return p if p.is_absolute() else Path(sandbox) / p


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict (CPU); raises TrainingError with a clear message."""
    if not path.exists():
        raise TrainingError(f"checkpoint {path} does not exist on this node")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainingError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(ck, dict) or "model_state" not in ck or "task" not in ck:
        raise TrainingError(f"{path} is not a training checkpoint of this server (no model_state/task)")
    return ck


def task_of(ck: dict[str, Any]) -> TaskInfo:
    t = dict(ck["task"])
    t["input_shape"] = tuple(t.get("input_shape") or ())
    return TaskInfo(**t)


def load_state(model: nn.Module, state: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {where} does not fit this job's model: {exc}") from exc


def load_checkpoint(path: str | Path) -> TrainedModel:
    """A model ready for inference (eval mode) from a checkpoint file."""
    p = Path(path)
    ck = read_checkpoint(p)
    task = task_of(ck)
    job = ck.get("job") or {}
    arch = ck.get("architecture") or job.get("architecture")
    preset = ck.get("preset") or job.get("model") or "base"
    layers = job.get("layers") if preset == "custom" else None
    try:
        model = build_model(arch, preset, task, layers=layers)
    except ModelError as exc:
        raise TrainingError(f"checkpoint {p}: cannot rebuild its model: {exc}") from exc
    load_state(model, ck["model_state"], str(p))
    model.eval()
    tok = Tokenizer.from_dict(ck["tokenizer"]) if ck.get("tokenizer") else None
    return TrainedModel(
        model=model,
        task=task,
        tokenizer=tok,
        label_names=list(ck.get("label_names") or []),
        architecture=arch,
        preset=preset,
        max_len=int(ck.get("max_len") or task.max_len),
        session_id=job.get("session_id"),
        metrics=dict(ck.get("metrics") or {}),
        checkpoint=str(p),
        epoch=int(ck.get("epoch") or 0),
    )
