"""Errors the caller can act on. The tool layer turns them into ToolError sentences."""

from __future__ import annotations

from workers.protocol import StrEnum  # enum.StrEnum is 3.11+


class NextStep(StrEnum):
    """What the caller can do about an error or a state, in domain words: the tool layer names the tool."""

    INIT_CLUSTER = "init_cluster"
    LIST_CLUSTERS = "list_clusters"
    TERMINATE_CLUSTER = "terminate_cluster"
    TERMINATE_NODES = "terminate_nodes"
    DEPLOY = "deploy"
    DEPLOY_INFERENCE = "deploy_inference"
    DEPLOY_WORKERS = "deploy_workers"
    REMOVE_NODES = "remove_nodes"
    CHECK_NODES = "check_nodes"
    LIST_NODES = "list_nodes"
    CONNECT = "connect"
    CHOOSE_BACKEND = "choose_backend"
    UPLOAD = "upload"
    TRAIN = "train"
    TRAIN_OR_LOAD = "train_or_load"
    STOP_TRAINING = "stop_training"
    LIST_CHECKPOINTS = "list_checkpoints"
    FIND_SESSION = "find_session"
    LIST_TEMPLATES = "list_templates"


class ServiceError(Exception):
    """What went wrong, in one or two sentences, and what to do next (``next_step``, if any)."""

    def __init__(self, message: str, next_step: NextStep | None = None) -> None:
        super().__init__(message)
        self.next_step = next_step


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass
