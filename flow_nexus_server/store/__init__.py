"""SQLAlchemy state store: the truth a restarted server recovers from."""

from flow_nexus_server.store.db import Store
from flow_nexus_server.store.tables import (
    Checkpoint,
    Cluster,
    Event,
    MetricSample,
    ModelAlias,
    ModelRelease,
    Node,
    TrainingSession,
)

__all__ = ["Store", "Checkpoint", "Cluster", "Event", "MetricSample", "ModelAlias", "ModelRelease", "Node",
           "TrainingSession"]
