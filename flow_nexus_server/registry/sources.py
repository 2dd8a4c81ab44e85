"""Where a release's artifacts come from: a cluster's current model, a session's final or best
checkpoint, a checkpoint, or an export / release folder. Each writes the artifacts into a new
folder and says where they came from (provenance)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from flow_nexus_server.registry import manifest as mf
from flow_nexus_server.service.errors import NextStep, NotFound, ServiceError
from flow_nexus_server.service.inference import InferenceService
from flow_nexus_server.service.paths import under_allowed_root
from flow_nexus_server.store import Checkpoint, MetricSample, TrainingSession

MAX_COPY_BYTES = 4 << 30  # an export folder copied into the registry


def fill(inference: InferenceService, source: str, checkpoint: str, target: Path) -> dict[str, Any]:
    """Write the model ``source`` names into the new folder ``target``; returns its provenance."""
    store = inference.clusters.store
    if source.startswith("dnc_"):
        cluster, nodes, _ = inference.serving_nodes(source)
        inference.export(source, "safetensors", str(target))
        with store.session() as s:
            session = s.scalars(select(TrainingSession).where(TrainingSession.cluster_id == source)
                                .order_by(TrainingSession.created_at.desc())).first()
        return {"source": source, "cluster": source, "session": session.id if session else None,
                "nodes": [n.id for n in nodes]}
    if source.startswith("train_"):
        ck = _session_checkpoint(inference, source, checkpoint)
        inference.export(ck.id, "safetensors", str(target))
        return {"source": source, "cluster": ck.cluster_id, "session": source, "checkpoint": ck.id,
                "checkpoint_kind": checkpoint, "epoch": ck.epoch, "nodes": [ck.node_id]}
    if source.startswith("ckpt_"):
        with store.session() as s:
            ck = s.get(Checkpoint, source)
        inference.export(source, "safetensors", str(target))
        return {"source": source, "cluster": ck.cluster_id if ck else None, "session": ck.session_id if ck else None,
                "checkpoint": source, "nodes": [ck.node_id] if ck else []}
    return _copy_folder(inference, source, target)


def _session_checkpoint(inference: InferenceService, session_id: str, which: str) -> Checkpoint:
    """The session's last checkpoint, or ("best") the one at the epoch of its lowest val_loss."""
    with inference.clusters.store.session() as s:
        if s.get(TrainingSession, session_id) is None:
            raise NotFound(f"training session {session_id!r} does not exist", next_step=NextStep.FIND_SESSION)
        kept = list(s.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id,
                                                       Checkpoint.deleted.is_(False))))
        losses = {row.epoch: row.value for row in s.scalars(
            select(MetricSample).where(MetricSample.session_id == session_id, MetricSample.name == "val_loss"))}
    kept = [ck for ck in kept if Path(ck.path).is_file()]
    if not kept:
        raise ServiceError(f"session {session_id} has no checkpoint left on disk to register; register its "
                           "cluster (its current model) instead")
    if which == "best":
        scored = [ck for ck in kept if ck.epoch in losses]
        if not scored:
            raise ServiceError(f"session {session_id} recorded no val_loss at the epochs of its checkpoints; "
                               "use checkpoint 'final'")
        return min(scored, key=lambda ck: (losses[ck.epoch], -ck.epoch))
    return max(kept, key=lambda ck: (ck.epoch, ck.created_at))


def _copy_folder(inference: InferenceService, source: str, target: Path) -> dict[str, Any]:
    folder = under_allowed_root(source, inference.clusters.settings.allowed_roots, "source")
    if not folder.is_dir():
        raise ServiceError(f"source {source!r} is not a cluster id (dnc_...), session id (train_...), checkpoint id "
                           "(ckpt_...) or an existing export directory")
    if not (folder / "config.json").is_file():
        raise ServiceError(f"{folder} is not an export of this server (no config.json); export the model with "
                           "neural_model_export (format safetensors) and register that folder")
    files = [p for p in folder.iterdir()]
    bad = [p.name for p in files if p.is_symlink() or not p.is_file()]
    if bad:
        raise ServiceError(f"{folder} holds {', '.join(sorted(bad))}, which are not plain files; a release folder "
                           "is flat")
    if sum(p.stat().st_size for p in files) > MAX_COPY_BYTES:
        raise ServiceError(f"{folder} holds more than {MAX_COPY_BYTES >> 30} GiB; register a smaller export")
    copied = None
    if (folder / mf.MANIFEST).is_file():
        copied = mf.read(folder)
        try:
            mf.verify(folder, copied)
        except mf.ManifestError as exc:
            raise ServiceError(f"the release folder {folder} does not verify: {exc}") from exc
    target.mkdir(mode=0o700)
    for path in files:
        if path.name != mf.MANIFEST:
            shutil.copyfile(path, target / path.name)
            (target / path.name).chmod(0o600)
    provenance: dict[str, Any] = {"source": str(folder)}
    if copied is not None:
        provenance["copied_manifest"] = copied
    return provenance
