"""Distillation: one student trained through a cluster on a transfer set labelled by a teacher
ensemble (its averaged class probabilities' argmax: hard-label distillation, which the training
jobs take as plain labels)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flow_nexus_server.registry.evaluation import EvalSet
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.inference import InferenceService
from flow_nexus_server.service.training import TrainingService

STUDENT_EPOCHS = 8
STUDENT_LEARNING_RATE = 0.003
TRAIN_TIMEOUT_S = 1800


def teacher_labels(inference: InferenceService, teacher_cluster: str, transfer: EvalSet) -> list[str]:
    """The ensemble's answer for every transfer example (mean of the nodes' class probabilities)."""
    reply = inference.predict(teacher_cluster, json.dumps(transfer.inputs), "mean", "replicate", "global", False)
    return list(reply.prediction) if isinstance(reply.prediction, list) else [reply.prediction]


def train_student(training: TrainingService, student_cluster: str, transfer: EvalSet, labels: list[str],
                  architecture: str | None, epochs: int, stop: Callable[[], None]) -> dict[str, Any]:
    """Train the student on (transfer inputs, teacher labels) through ``student_cluster``; the session's
    final metrics."""
    args: dict[str, Any] = {"dataset": json.dumps({"X": transfer.inputs, "y": labels}), "epochs": epochs,
                            "learning_rate": STUDENT_LEARNING_RATE}
    if architecture:
        args["architecture"] = architecture
    started = training.start_from_dict(student_cluster, args)
    if not training.wait(started.session_id, TRAIN_TIMEOUT_S):
        stop()
        raise ServiceError(f"the student's training {started.session_id} did not finish in {TRAIN_TIMEOUT_S} s")
    status = training.status(started.session_id)
    if status.status != "completed":
        raise ServiceError(f"the student's training {started.session_id} ended {status.status}: "
                           f"{status.error or 'see neural_training_status'}")
    return {"session": started.session_id, "final_metrics": status.final_metrics}
