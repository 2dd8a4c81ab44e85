"""Checkpoint files: written by the reporting rank, read on resume and for inference.

A checkpoint is ONE safetensors file, ``ckpt-<session>-e<NNN>.safetensors``: the model's
tensors under ``model.<name>``, the optimizer state's tensors under ``optim.<path>``, and
every other field as JSON in the file's metadata (key ``flow_nexus``): ``job``
(``TrainJob.model_dump()``), ``task`` (``asdict(TaskInfo)``), ``tokenizer``
(the tokenizer's ``to_dict()``: word for text, BPE for language models; or None),
``label_names``, ``architecture``, ``preset``,
``max_len``, ``epoch`` (epoch or federated round), ``mode``, ``metrics`` (the latest global
metrics), ``hf_config`` (a GPT-2 language model's exact config, which rebuilds it whatever the
job's preset; None for other models) and the optimizer state's non-tensor structure. Nothing in it is pickled: a file a
client placed can at worst fail to load, never run code.

:func:`read_checkpoint` returns the dict the rest of the code uses (``model_state``,
``optimizer_state`` and the fields above). A ``.pt`` file is read only with
``torch.load(weights_only=True)`` (plain tensors and containers); one that needs more is
refused with how to convert it (:func:`convert_legacy`, ``flow-nexus-server
convert-checkpoint``).

A raft replica's ``<sandbox>/raft/committed.safetensors`` has the same format (plus a
``raft`` entry: term, version, commit index), so ``resume_from`` and
:func:`load_checkpoint` accept it; its ``epoch`` is the committed round.

Checkpoints written inside a node's sandbox count toward its quota
(``TrainJob.sandbox_quota_bytes``): one that would pass it fails the session with a sentence
instead of filling the disk.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.data import load_tokenizer
from workers.models import ModelError, TaskInfo, build_model
from workers.protocol import CHECKPOINT_NAME_RE, CHECKPOINT_SUFFIX, TrainJob

from .common import TrainedModel, TrainingError

log = logging.getLogger(__name__)

METADATA_KEY = "flow_nexus"
"""The safetensors metadata entry that holds a checkpoint's JSON fields."""
FORMAT_VERSION = 1


def safe_session(session_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", session_id) or "session"


def checkpoint_dir(job: TrainJob, sandbox: Path) -> Path:
    if job.checkpoint_dir:
        d = Path(os.path.expanduser(job.checkpoint_dir))
        return d if d.is_absolute() else Path(sandbox) / d
    return Path(sandbox) / "checkpoints"


def checkpoint_name(session_id: str, epoch: int) -> str:
    return f"ckpt-{safe_session(session_id)}-e{int(epoch):03d}{CHECKPOINT_SUFFIX}"


def session_checkpoints(directory: Path, session_id: str) -> list[Path]:
    """This session's checkpoint files in ``directory``, oldest epoch first."""
    safe = safe_session(session_id)
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = CHECKPOINT_NAME_RE.match(p.name)
            if m and m.group("session") == safe:
                found.append((int(m.group("epoch")), p))
    return [p for _, p in sorted(found)]


def checkpoint_payload(
    job: TrainJob,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    task: TaskInfo,
    tokenizer: Any,
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
        "hf_config": hf_config_of(model),
        **extra,
    }


def hf_config_of(model: nn.Module) -> dict[str, Any] | None:
    """A GPT-2 language model's exact config (what rebuilds it whatever the job's preset); None for others."""
    config = getattr(model, "hf_config_dict", None)
    return config() if callable(config) else None


def recorded_hf_config(path: Path) -> dict[str, Any] | None:
    """The GPT-2 config a resume source records, read without loading weights: a Hugging Face
    directory's config.json, or a checkpoint file's ``hf_config``; None when it records none or
    cannot be read (training then reports what is wrong with it)."""
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            return config if isinstance(config, dict) and config.get("model_type") == "gpt2" else None
        if path.suffix == CHECKPOINT_SUFFIX and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:  # the header only
                fields = json.loads((f.metadata() or {})[METADATA_KEY])["fields"]
            config = fields.get("hf_config")
            return config if isinstance(config, dict) else None
    except Exception:  # unreadable: the trainer's own reading says why
        log.info("no GPT-2 config read from %s", path, exc_info=True)
    return None


# --------------------------------------------------------------------------- the file format
# Non-tensor values become JSON; tuples and dicts with non-string keys (an optimizer's state is
# keyed by parameter index) are tagged so that they come back exactly as they were.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _to_json(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under names starting with ``path``."""
    if isinstance(value, torch.Tensor):
        name = path
        while name in tensors:  # keys with dots could collide: keep both
            name += "_"
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _to_json(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[_to_json(k, path, {}), _to_json(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    raise TrainingError(f"a checkpoint cannot hold a {type(value).__name__} (at {path})")


def _from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_from_json(v, tensors) for v in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {_hashable(_from_json(k, tensors)): _from_json(v, tensors) for k, v in value[_ITEMS]}
    return {k: _from_json(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor)):
        raise ValueError("a dict key in the metadata is not a plain value")
    return key


def encode_checkpoint(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a checkpoint dict."""
    model_state = payload["model_state"]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    fields = {k: v for k, v in payload.items() if k != "model_state"}
    meta = {
        "format_version": FORMAT_VERSION,
        "model_keys": list(model_state),
        "fields": {k: _to_json(v, "optim" if k == "optimizer_state" else f"extra.{k}", tensors)
                   for k, v in fields.items()},
    }
    return tensors, {METADATA_KEY: json.dumps(meta)}


def decode_checkpoint(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, Any]:
    """The checkpoint dict back from a file's tensors and metadata; ValueError/KeyError when
    the file is not a checkpoint of this server."""
    meta = json.loads((metadata or {})[METADATA_KEY])
    ck = _from_json(meta["fields"], tensors)
    ck["model_state"] = {k: tensors[f"model.{k}"] for k in meta["model_keys"]}
    return ck


def encoded_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """What the file will take on disk, give or take its small per-tensor header entries."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, metadata.values())) \
        + 100 * len(tensors)


@dataclass(frozen=True)
class SandboxQuota:
    """A node's disk allowance: checkpoints written under ``sandbox`` may not bring it past ``limit``."""

    node_id: str
    sandbox: Path
    limit: int | None

    def check(self, path: Path, size: int) -> None:
        """Raise TrainingError when writing ``size`` bytes to ``path`` would pass the limit."""
        if self.limit is None:
            return
        sandbox = Path(os.path.realpath(self.sandbox))
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(sandbox):
            return  # written outside the sandbox (an absolute checkpoint_dir): not this quota's business
        replaced = target.stat().st_size if target.is_file() else 0
        total = sandbox_bytes(sandbox) - replaced + size
        if total > self.limit:
            raise TrainingError(
                f"checkpoint of {size} bytes would bring node {self.node_id}'s sandbox to {total} bytes, over its "
                f"limit of {self.limit} (FLOW_NEXUS_MAX_SANDBOX_BYTES); lower checkpoint_every/max_checkpoints "
                "or raise the limit")


def sandbox_bytes(sandbox: Path) -> int:
    """Bytes of the files under ``sandbox`` (symbolic links are not followed)."""
    total = 0
    for root, _, files in os.walk(sandbox):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we looked
    return total


def write_atomic(path: Path, payload: dict[str, Any], quota: SandboxQuota | None = None) -> None:
    """Write the checkpoint to a temporary name next to ``path``, then rename it over ``path``.

    With ``quota``, refuse first (TrainingError) when the file would pass the sandbox's limit."""
    from safetensors.torch import save_file

    tensors, metadata = encode_checkpoint(payload)
    if quota is not None:
        quota.check(path, encoded_bytes(tensors, metadata))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(
    directory: Path,
    job: TrainJob,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    task: TaskInfo,
    tokenizer: Any,
    label_names: list[str],
    max_len: int,
    metrics: dict[str, float],
    quota: SandboxQuota | None = None,
    keep: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, list[Path]]:
    """Write the checkpoint atomically; returns (path, files deleted by the rotation). ``keep`` (the
    best checkpoint) is never rotated away and does not count toward max_checkpoints; ``extra``:
    further fields (e.g. ``secagg_pending``: a round recovered after a worker dropped out)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(job.session_id, epoch)
    write_atomic(path, checkpoint_payload(job, epoch, model, optimizer, task, tokenizer, label_names, max_len,
                                          metrics, **(extra or {})), quota)
    removed = []
    files = [f for f in session_checkpoints(directory, job.session_id) if keep is None or f != keep]
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


# --------------------------------------------------------------------------- reading

def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict (CPU) without unpickling anything; raises TrainingError with a clear message."""
    if path.is_dir():
        return _read_huggingface(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist on this node")
    ck = _read_safetensors(path) if path.suffix == CHECKPOINT_SUFFIX else _read_weights_only(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("model_state"), dict) or not isinstance(ck.get("task"), dict):
        raise TrainingError(f"{path} is not a training checkpoint of this server (no model_state/task)")
    return ck


def _read_huggingface(path: Path) -> dict[str, Any]:
    """A Hugging Face GPT-2 directory as a checkpoint at epoch 0: fine-tuning starts from its weights
    (safetensors and JSON only, see workers.hf_export) in its own shape (``hf_config``), whatever preset
    the cluster's nodes were deployed with."""
    from dataclasses import asdict

    from workers.hf_export import HuggingFaceError, is_huggingface_dir, load_huggingface

    if not is_huggingface_dir(path):
        raise TrainingError(f"{path} is a directory but not a Hugging Face model (no config.json with a model_type)")
    try:
        trained, _ = load_huggingface(path)
    except HuggingFaceError as exc:
        raise TrainingError(str(exc)) from None
    return {"model_state": {k: v.detach().clone() for k, v in trained.model.state_dict().items()},
            "optimizer_state": None, "job": {}, "task": asdict(trained.task), "tokenizer": trained.tokenizer.to_dict(),
            "label_names": [], "architecture": "transformer", "preset": trained.preset, "max_len": trained.max_len,
            "epoch": 0, "mode": "sync", "metrics": dict(trained.metrics), "hf_config": hf_config_of(trained.model),
            "source": "huggingface"}


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # a damaged or foreign file: say what it is not
        log.info("reading %s as safetensors failed", path, exc_info=True)
        raise TrainingError(f"checkpoint {path} cannot be read: it is not a valid safetensors file") from exc
    try:
        return decode_checkpoint(tensors, metadata)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        log.info("decoding %s failed", path, exc_info=True)
        raise TrainingError(f"{path} is a safetensors file but not a training checkpoint of this server "
                            f"(no '{METADATA_KEY}' metadata)") from exc


def _read_weights_only(path: Path) -> Any:
    """A ``.pt`` file, through torch's restricted unpickler only (tensors and plain containers)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # it needs objects the restricted unpickler refuses
        log.info("weights-only load of %s refused", path, exc_info=True)
        raise TrainingError(
            f"{path} is a pickle file that holds more than tensors (an old checkpoint of this server, or a file "
            "made elsewhere); it is not loaded because unpickling can run arbitrary code. If you trust it, convert "
            f"it where it lives with 'flow-nexus-server convert-checkpoint {path}' and use the .safetensors file "
            "that writes") from exc
    except Exception as exc:
        log.info("torch.load(weights_only=True) of %s failed", path, exc_info=True)
        raise TrainingError(f"checkpoint {path} cannot be read: it is neither a safetensors checkpoint nor a "
                            "torch file of plain tensors") from exc


def convert_legacy(old: str | Path, new: str | Path | None = None) -> Path:
    """Convert an old pickle checkpoint (``ckpt-*.pt``) of this server to the safetensors format.

    Runs ``torch.load(weights_only=False)``: unpickling runs whatever code the file holds, so
    call this only on a file you trust, on your own machine. Nothing else in this project
    unpickles. Returns the path written (``old`` with the suffix ``.safetensors`` by default).
    """
    old = Path(old)
    new = Path(new) if new is not None else old.with_suffix(CHECKPOINT_SUFFIX)
    if new.suffix != CHECKPOINT_SUFFIX:
        raise TrainingError(f"the converted checkpoint must be named *{CHECKPOINT_SUFFIX}, got {new}")
    if not old.is_file():
        raise TrainingError(f"{old} does not exist")
    try:
        ck = torch.load(old, map_location="cpu", weights_only=False)  # trusted by the user who asked
    except Exception as exc:
        raise TrainingError(f"{old} cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ck, dict) or not isinstance(ck.get("model_state"), dict) or "task" not in ck:
        raise TrainingError(f"{old} is not a training checkpoint of this server (no model_state/task)")
    # safetensors refuses tensors that share memory (tied weights): one copy each
    ck["model_state"] = {k: v.detach().clone() for k, v in ck["model_state"].items()}
    write_atomic(new, ck)
    read_checkpoint(new)  # what resume and load will see
    return new


def task_of(ck: dict[str, Any]) -> TaskInfo:
    t = dict(ck["task"])
    t["input_shape"] = tuple(t.get("input_shape") or ())
    try:
        return TaskInfo(**t)
    except TypeError as exc:
        raise TrainingError(f"the checkpoint's task {sorted(t)} is not one this server writes") from exc


def load_state(model: nn.Module, state: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {where} does not fit this job's model: {exc}") from exc


def load_checkpoint(path: str | Path) -> TrainedModel:
    """A model ready for inference (eval mode) from a checkpoint file."""
    return model_from_checkpoint(read_checkpoint(Path(path)), Path(path))


def model_from_checkpoint(ck: dict[str, Any], p: Path) -> TrainedModel:
    """The model of a checkpoint dict already read from ``p``, ready for inference (eval mode)."""
    try:
        return _model_from_checkpoint(ck, p)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # metadata written by someone else
        log.info("rebuilding the model of %s failed", p, exc_info=True)
        raise TrainingError(f"{p} is not a training checkpoint this server can use (its fields are incomplete "
                            "or foreign)") from exc


def _model_from_checkpoint(ck: dict[str, Any], p: Path) -> TrainedModel:
    task = task_of(ck)
    tokenizer = ck.get("tokenizer")
    if task.kind == "lm" and (tokenizer or {}).get("type") != "bpe":
        raise TrainingError(f"{p} is a language model of an older version of this server (word-level vocabulary, "
                            "hand-written transformer) that it can no longer load; train the model again")
    job = ck.get("job") or {}
    arch = ck.get("architecture") or job.get("architecture")
    preset = ck.get("preset") or job.get("model") or "base"
    layers = job.get("layers") if preset == "custom" else None
    try:
        model = build_model(arch, preset, task, layers=layers, hf_config=ck.get("hf_config"))
    except ModelError as exc:
        raise TrainingError(f"checkpoint {p}: cannot rebuild its model: {exc}") from exc
    load_state(model, ck["model_state"], str(p))
    model.eval()
    tok = load_tokenizer(tokenizer) if tokenizer else None
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
