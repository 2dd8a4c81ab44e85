"""The training engine of a node: real distributed PyTorch training by role and mode.

Entry point :func:`run_training` (called by the node agent on its torch.distributed thread
after the default process group is initialised). Modes: ``sync`` (DDP over the workers,
gradients combined along the topology by ``workers.comm``'s hook), ``parameter_server``
(parameter shards owned by PS ranks: reduce gradients, broadcast weights) and ``federated``
(FedAvg or a robust rule from ``workers.aggregation``). ``job.consensus`` decides how updates
are agreed on: proof-of-learning (default: a validator -- or the aggregator -- commits a
federated round only if validation loss does not rise beyond ``pol_tolerance``), byzantine
(robust rules, federated and sync via a gradient hub: ``robust_sync``), raft (the aggregator
leads; versions commit on a majority of acknowledgements, replicas in ``<sandbox>/raft/``)
and gossip (neighbour averaging without an aggregator: ``gossip``). ``adversary`` simulates
Byzantine workers for robustness tests. Progress is reported through a
thread-safe :class:`ProgressSink`; checkpoints are read back with :func:`load_checkpoint`.

Where things live: ``engine`` (the order of work), ``modes`` (mode -> groups, device, loop),
``loop`` (the epoch loop and its step strategies' interface), ``sync`` / ``ps`` /
``robust_sync`` (step strategies), ``federated`` (the round loop), ``commit`` (its commit
rules), ``gossip``, ``consensus`` (rules, reputation, raft replica), ``runtime`` (per-rank
state and epoch-boundary work), ``setup`` (roles, data, vocabulary).
"""

from .checkpoint import checkpoint_name, load_checkpoint, session_checkpoints
from .common import TrainedModel, TrainingError
from .engine import run_training
from .progress import ProgressSink

__all__ = [
    "ProgressSink",
    "TrainedModel",
    "TrainingError",
    "checkpoint_name",
    "load_checkpoint",
    "run_training",
    "session_checkpoints",
]
