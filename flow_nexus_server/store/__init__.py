"""SQLAlchemy state store: the truth a restarted server recovers from."""

from flow_nexus_server.store.db import Store
from flow_nexus_server.store.tables import Cluster, Event, Node, TrainingSession

__all__ = ["Store", "Cluster", "Node", "TrainingSession", "Event"]
