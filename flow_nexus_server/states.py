"""Cluster, node and training-session states, and the one table of moves each may make.

The values are the strings the store holds and the replies show (unchanged, so existing
``state.db`` files read as before). Every change of a stored state goes through ``move`` (or
``transition`` for a copy held in memory): a move its table does not list is logged and refused
with ``IllegalTransition``, so no untrue state is ever written. Staying in the same state is
not a move and is always allowed.

Nodes report their job's state (``workers.protocol.JobState``); that is the node's own
concept and is not stored here.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from flow_nexus_server.service.errors import Conflict
from workers.protocol import StrEnum

log = logging.getLogger(__name__)


class ClusterState(StrEnum):
    INITIALIZING = "initializing"  # created; no node deployed yet, or none left
    READY = "ready"  # nodes are up; no process group formed yet
    CONNECTED = "connected"  # a process group is formed over the live nodes
    TRAINING = "training"  # a session runs on the group
    NEEDS_CONNECT = "needs_connect"  # membership changed or forming failed: connect again
    TERMINATED = "terminated"  # every node stopped; final


class NodeState(StrEnum):
    STARTING = "starting"  # launched, not yet healthy
    RUNNING = "running"  # answered its health check
    FAILED = "failed"  # did not start, or died / went silent / passed its memory limit
    LOST = "lost"  # not found alive after a server restart, or not verified gone at terminate
    REMOVED = "removed"  # stopped on request (neural_node_remove)
    STOPPED = "stopped"  # stopped with its cluster


class SessionState(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"  # on request
    INTERRUPTED = "interrupted"  # no longer ran on the nodes when the server restarted


C, N, S = ClusterState, NodeState, SessionState

CLUSTER_MOVES: dict[ClusterState, frozenset[ClusterState]] = {
    # connected / needs_connect: a group may be formed whenever live nodes exist (say a server
    # stopped between starting nodes and recording them as ready)
    C.INITIALIZING: frozenset({C.READY, C.CONNECTED, C.NEEDS_CONNECT, C.TERMINATED}),
    C.READY: frozenset({C.INITIALIZING, C.CONNECTED, C.NEEDS_CONNECT, C.TERMINATED}),
    C.CONNECTED: frozenset({C.INITIALIZING, C.TRAINING, C.NEEDS_CONNECT, C.TERMINATED}),
    # connected: a session ended, or healing re-formed the group under it
    C.TRAINING: frozenset({C.CONNECTED, C.NEEDS_CONNECT, C.TERMINATED}),
    # training: a session restarted on the survivors, or re-attached after a server restart
    C.NEEDS_CONNECT: frozenset({C.INITIALIZING, C.CONNECTED, C.TRAINING, C.TERMINATED}),
    C.TERMINATED: frozenset(),
}

NODE_MOVES: dict[NodeState, frozenset[NodeState]] = {
    N.STARTING: frozenset({N.RUNNING, N.FAILED, N.LOST, N.REMOVED, N.STOPPED}),
    N.RUNNING: frozenset({N.FAILED, N.LOST, N.REMOVED, N.STOPPED}),
    N.FAILED: frozenset(),
    N.LOST: frozenset(),
    N.REMOVED: frozenset(),
    N.STOPPED: frozenset(),
}

SESSION_MOVES: dict[SessionState, frozenset[SessionState]] = {
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.STOPPED, S.INTERRUPTED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.STOPPED: frozenset(),
    S.INTERRUPTED: frozenset(),
}
del C, N, S

_TABLES: dict[type[StrEnum], tuple[str, dict[Any, frozenset[Any]]]] = {
    ClusterState: ("cluster", CLUSTER_MOVES),
    NodeState: ("node", NODE_MOVES),
    SessionState: ("session", SESSION_MOVES),
}

LIVE_NODE_STATES = (NodeState.STARTING, NodeState.RUNNING)
FORMED_CLUSTER_STATES = (ClusterState.CONNECTED, ClusterState.TRAINING)  # a process group exists
ENDED_SESSION_STATES = frozenset(state for state, moves in SESSION_MOVES.items() if not moves)

State = TypeVar("State", ClusterState, NodeState, SessionState)


class IllegalTransition(Conflict):
    """A state change the transition table does not allow: refused, nothing written."""


def is_terminal(state: ClusterState | NodeState | SessionState) -> bool:
    return not _TABLES[type(state)][1][state]


def transition(current: str, target: State, subject_id: str) -> State:
    """``target`` when the table allows ``current`` -> ``target``; otherwise logs and raises."""
    if type(target) not in _TABLES:
        raise TypeError(f"a new state is a ClusterState, NodeState or SessionState, not {target!r}")
    kind, table = _TABLES[type(target)]
    try:
        source = type(target)(current)
    except ValueError:
        source = None  # a value this release does not know: nothing says it may move
    if source == target or (source is not None and target in table[source]):
        return target
    log.error("refused: %s %s is %s and cannot become %s", kind, subject_id, current, target)
    raise IllegalTransition(f"{kind} {subject_id} is {current} and cannot become {target}")


def move(row: Any, target: State) -> None:
    """Set a cluster, node or session row's ``status`` to ``target``, if its table allows it."""
    row.status = transition(row.status, target, row.id)
