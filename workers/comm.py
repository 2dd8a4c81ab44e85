"""Averaging tensors across node processes along a topology, and DDP communication hooks.

:class:`TopologyReducer` averages a float tensor across a set of ranks with real
``torch.distributed`` traffic, routed the way the cluster's topology says
(README, "What the parameters mean here"):

* ``mesh``          ``dist.all_reduce`` (SUM) on the reducer's group, then divide.
* ``ring``          explicit ring all-reduce along the order of ``ranks``: reduce-scatter, then
                    all-gather, each ``n - 1`` steps of ``dist.isend``/``dist.irecv`` to the next /
                    from the previous rank of the ring. The tensor is cut into ``n`` chunks with
                    ``torch.tensor_split`` (sizes differ by at most one element; empty chunks,
                    when the tensor has fewer than ``n`` elements, are skipped by both sides).
* ``star``          every non-hub rank sends its tensor to the hub (point to point); the hub sums
                    in ``ranks`` order, divides and sends the mean back to each rank.
* ``hierarchical``  ranks are split into clusters (:func:`hierarchy_groups`, ~sqrt(n) ranks
                    each, first rank = leader). ``dist.reduce`` to the leader on a cluster group,
                    ``dist.all_reduce`` among the leaders on a leader group, leaders divide and
                    ``dist.broadcast`` back on their cluster group.

All ranks end up with bit-identical results (the sum is computed once per chunk / by the hub /
by gloo and then copied), which DDP relies on to keep replicas equal.

Construction is collective: every rank of the *default* group must construct the same
reducers in the same order (they call ``dist.new_group``), members or not. A rank that is not
in ``ranks`` must not call the exchange methods.

Byte counters (``bytes_sent`` / ``bytes_received``, per rank, payload bytes =
``numel * element_size`` per message, no headers):

* point-to-point traffic (``ring``, ``star``) is counted message by message as it is posted;
* gloo collectives (``mesh``, and the cluster / leader steps of ``hierarchical``) do not expose
  their wire traffic, so they are counted with a stated model: ``all_reduce`` over ``m`` ranks
  = the ring algorithm's per-rank volume (``~2(m-1)/m`` of the tensor each way), ``reduce`` =
  each non-root sends the tensor once and the root receives ``m - 1`` tensors, ``broadcast`` =
  the root sends ``m - 1`` copies, ``all_gather`` = ``m - 1`` blocks each way.

:meth:`TopologyReducer.dense_bytes_for` returns the same numbers without sending anything.
``comm_seconds`` is wall time spent inside the exchange methods (waiting, local sums and
divisions included).

:func:`make_ddp_hook` turns a reducer into a ``DistributedDataParallel`` communication hook
(``ddp.register_comm_hook(state, hook)``), optionally with top-k gradient compression and
error feedback. See its docstring for how each topology overlaps with backward.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workers.protocol import TOPOLOGIES, Topology  # noqa: F401 - TOPOLOGIES: re-exported

__all__ = [
    "TOPOLOGIES",
    "CommHookState",
    "Topology",
    "TopologyReducer",
    "hierarchy_groups",
    "make_ddp_hook",
]

log = logging.getLogger(__name__)

# Tags keep the phases of point-to-point exchanges apart (gloo matches sends and receives by
# peer and tag). Every exchange waits for all of its messages before returning, so exchanges
# never overlap on a group.
_TAG_RING_RS = 11
_TAG_RING_AG = 12
_TAG_STAR_UP = 13
_TAG_STAR_DOWN = 14
_TAG_GATHER_RING = 15
_TAG_GATHER_STAR_UP = 16
_TAG_GATHER_STAR_DOWN = 17


def hierarchy_groups(ranks: list[int], group_size: int | None = None) -> list[list[int]]:
    """Split ``ranks`` (kept in their order) into consecutive clusters; ``cluster[0]`` leads.

    ``group_size`` is the largest cluster size; by default ``ceil(sqrt(n))``. The number of
    clusters is ``ceil(n / group_size)`` and sizes are balanced (they differ by at most one),
    e.g. 4 ranks -> [[0, 1], [2, 3]], 3 -> [[0, 1], [2]], 5 -> [[0, 1, 2], [3, 4]].
    """
    ranks = list(ranks)
    n = len(ranks)
    if n == 0:
        raise ValueError("hierarchy_groups needs at least one rank")
    if group_size is None:
        group_size = max(1, math.ceil(math.sqrt(n)))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n_groups = math.ceil(n / group_size)
    base, extra = divmod(n, n_groups)
    groups: list[list[int]] = []
    start = 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        groups.append(ranks[start : start + size])
        start += size
    return groups


def _chunk_sizes(numel: int, n: int) -> list[int]:
    """Sizes of ``torch.tensor_split(t, n)`` for a 1-D tensor of ``numel`` elements."""
    base, extra = divmod(numel, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _ring_volume(numel: int, n: int, pos: int) -> tuple[int, int]:
    """Elements (sent, received) by position ``pos`` in a ring all-reduce over ``n`` ranks."""
    if n <= 1:
        return 0, 0
    c = _chunk_sizes(numel, n)
    # reduce-scatter sends every chunk but (pos+1), receives every chunk but pos;
    # all-gather sends every chunk but (pos+2), receives every chunk but (pos+1).
    sent = 2 * numel - c[(pos + 1) % n] - c[(pos + 2) % n]
    received = 2 * numel - c[pos] - c[(pos + 1) % n]
    return sent, received


def _wait_all(works: list[Any]) -> None:
    for w in works:
        if w is not None:
            w.wait()


class TopologyReducer:
    """Averages tensors across ``ranks`` (default: all ranks) along a topology.

    Args:
        topology: ``"mesh"``, ``"ring"``, ``"star"`` or ``"hierarchical"``.
        ranks: global ranks taking part, in ring / cluster order (default ``0..world-1``, or the
            ranks of ``group`` when one is given).
        hub: the star's hub (default ``ranks[0]``); ignored by the other topologies.
        group: an existing process group whose members are exactly ``ranks``; used for the mesh
            all-reduce and the point-to-point traffic. Default: a new group over ``ranks``
            (``dist.new_group``), so the reducer's traffic never interleaves with other
            collectives on the default group (e.g. DDP's own broadcasts).
        group_size: cluster size for ``hierarchical`` (default ``ceil(sqrt(n))``).
        timeout: timeout of the groups this reducer creates (default: the default group's).

    Must be constructed on every rank of the default group, in the same order.
    """

    def __init__(
        self,
        topology: Topology,
        ranks: list[int] | None = None,
        hub: int | None = None,
        group: Any = None,
        *,
        group_size: int | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; expected one of {', '.join(TOPOLOGIES)}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; join the process group before building a reducer"
            )
        world = dist.get_world_size()
        me = dist.get_rank()
        if ranks is None:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        ranks = [int(r) for r in ranks]
        if not ranks:
            raise ValueError("ranks must name at least one rank")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks contains duplicates: {ranks}")
        bad = [r for r in ranks if not 0 <= r < world]
        if bad:
            raise ValueError(f"ranks {bad} are outside the default group (world size {world})")
        if group is not None and set(dist.get_process_group_ranks(group)) != set(ranks):
            raise ValueError("group's members differ from ranks")
        if hub is None:
            hub = ranks[0]
        if hub not in ranks:
            raise ValueError(f"hub {hub} is not one of ranks {ranks}")

        self.topology: str = topology
        self.ranks: list[int] = ranks
        self.size: int = len(ranks)
        self.hub: int = int(hub)
        self.rank: int = me
        self.is_member: bool = me in ranks
        self.position: int | None = ranks.index(me) if self.is_member else None

        self.bytes_sent: int = 0
        self.bytes_received: int = 0
        self.comm_seconds: float = 0.0
        self.calls: int = 0
        self._lock = threading.Lock()

        # Collective over the default group: every rank runs the same new_group calls.
        self.group = group if group is not None else dist.new_group(ranks, timeout=timeout)
        # Global ranks in group-rank order (new_group sorts them); collectives fill outputs so.
        self._group_order: list[int] = dist.get_process_group_ranks(self.group) if self.is_member else []

        self.clusters: list[list[int]] = []
        self.leaders: list[int] = []
        self._cluster: list[int] | None = None
        self._cluster_pg: Any = None
        self._cluster_pg_ranks: list[int] = []
        self._leaders_pg: Any = None
        if topology == "hierarchical":
            self.clusters = hierarchy_groups(ranks, group_size)
            self.leaders = [c[0] for c in self.clusters]
            for cluster in self.clusters:
                pg = dist.new_group(cluster, timeout=timeout) if len(cluster) > 1 else None
                if me in cluster:
                    self._cluster = cluster
                    self._cluster_pg = pg
                    self._cluster_pg_ranks = sorted(cluster)  # new_group sorts its ranks
            if len(self.leaders) > 1:
                self._leaders_pg = dist.new_group(self.leaders, timeout=timeout)
        log.debug(
            "rank %d: %s reducer over %s (member=%s, hub=%s, clusters=%s)",
            me, topology, ranks, self.is_member, self.hub, self.clusters,
        )

    def __repr__(self) -> str:
        return f"TopologyReducer({self.topology!r}, ranks={self.ranks}, hub={self.hub})"

    # ------------------------------------------------------------------ public API

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` across the reducer's ranks; ``t`` is overwritten with the mean and returned.

        Every rank must pass a tensor of the same numel and floating dtype (any shape; a
        non-contiguous tensor is averaged through a contiguous copy and written back).
        """
        self._check_call(t, need_float=True)
        start = time.perf_counter()
        with torch.no_grad():
            if t.is_contiguous():
                flat = t.view(-1)
                sent, received = self._allreduce_mean_flat(flat)
            else:
                flat = t.reshape(-1).clone()
                sent, received = self._allreduce_mean_flat(flat)
                t.copy_(flat.view(t.shape))
        self._account(sent, received, time.perf_counter() - start)
        return t

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Gather ``t`` from every rank along the topology; row ``i`` of the result is ``ranks[i]``'s.

        Every rank must pass a tensor of the same numel and dtype (any dtype gloo can carry).
        Used by compressed DDP hooks to exchange (index, value) pairs along the topology.
        """
        self._check_call(t, need_float=False)
        start = time.perf_counter()
        with torch.no_grad():
            flat = t.detach().reshape(-1).contiguous()
            table, sent, received = self._allgather_flat(flat)
        self._account(sent, received, time.perf_counter() - start)
        return table

    def dense_bytes_for(self, numel: int, element_size: int = 4) -> tuple[int, int]:
        """Bytes (sent, received) this rank moves in one :meth:`allreduce_mean` of that size."""
        sent, received = self._allreduce_volume(int(numel))
        return sent * element_size, received * element_size

    def gather_bytes_for(self, numel: int, element_size: int = 1) -> tuple[int, int]:
        """Bytes (sent, received) this rank moves in one :meth:`allgather` of that size."""
        sent, received = self._allgather_volume(int(numel))
        return sent * element_size, received * element_size

    def counters(self) -> dict[str, float]:
        """The reducer's counters for this rank."""
        with self._lock:
            return {
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "comm_seconds": self.comm_seconds,
                "calls": self.calls,
            }

    # ------------------------------------------------------------------ internals

    def _check_call(self, t: torch.Tensor, need_float: bool) -> None:
        if not self.is_member:
            raise RuntimeError(
                f"rank {self.rank} is not one of this reducer's ranks {self.ranks}; only members exchange"
            )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
        if need_float and not t.is_floating_point():
            raise TypeError(f"allreduce_mean needs a floating-point tensor, got {t.dtype}")
        if t.device.type != "cpu" and self._uses_gloo():
            raise ValueError(f"gloo reducers take CPU tensors, got one on {t.device}")

    def _uses_gloo(self) -> bool:
        try:
            return dist.get_backend(self.group) == "gloo"
        except Exception:  # unknown backend: let torch complain later
            return False

    def _account(self, sent: int, received: int, seconds: float) -> None:
        with self._lock:
            self.bytes_sent += int(sent)
            self.bytes_received += int(received)
            self.comm_seconds += seconds
            self.calls += 1

    def _allreduce_volume(self, numel: int) -> tuple[int, int]:
        """Elements (sent, received) by this rank in one all-reduce of ``numel`` elements."""
        n = self.size
        if n == 1 or numel == 0:
            return 0, 0
        pos = self.position if self.position is not None else 0
        if self.topology in ("mesh", "ring"):
            return _ring_volume(numel, n, pos)
        if self.topology == "star":
            return ((n - 1) * numel, (n - 1) * numel) if self.rank == self.hub else (numel, numel)
        # hierarchical
        cluster = self._cluster or [self.rank]
        g = len(cluster)
        if self.rank == cluster[0]:
            sent, received = _ring_volume(numel, len(self.leaders), self.leaders.index(self.rank))
            return sent + (g - 1) * numel, received + (g - 1) * numel
        return numel, numel

    def _allgather_volume(self, numel: int) -> tuple[int, int]:
        n = self.size
        if n == 1:
            return 0, 0
        if self.topology in ("mesh", "ring"):
            return (n - 1) * numel, (n - 1) * numel
        if self.topology == "star":
            if self.rank == self.hub:
                return (n - 1) * n * numel, (n - 1) * numel
            return numel, n * numel
        cluster = self._cluster or [self.rank]
        g = len(cluster)
        if self.rank == cluster[0]:
            gmax = max(len(c) for c in self.clusters)
            n_leaders = len(self.leaders)
            block = gmax * numel
            return (
                (n_leaders - 1) * block + (g - 1) * n * numel,
                (g - 1) * numel + (n_leaders - 1) * block,
            )
        return numel, n * numel

    def _allreduce_mean_flat(self, flat: torch.Tensor) -> tuple[int, int]:
        """Average the contiguous 1-D ``flat`` in place; returns bytes (sent, received)."""
        if self.size == 1 or flat.numel() == 0:
            return 0, 0
        esize = flat.element_size()
        if self.topology == "mesh":
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.size)
            sent, received = self._allreduce_volume(flat.numel())
            return sent * esize, received * esize
        if self.topology == "ring":
            return self._ring_allreduce(flat)
        if self.topology == "star":
            return self._star_allreduce(flat)
        return self._hierarchical_allreduce(flat)

    def _ring_allreduce(self, flat: torch.Tensor) -> tuple[int, int]:
        n = self.size
        p = self.position
        assert p is not None
        nxt = self.ranks[(p + 1) % n]
        prv = self.ranks[(p - 1) % n]
        chunks = list(torch.tensor_split(flat, n))
        scratch = torch.empty(max(c.numel() for c in chunks), dtype=flat.dtype)
        esize = flat.element_size()
        sent = received = 0
        # reduce-scatter: after step s, chunk (p - s - 1) holds the sum of s + 2 ranks' parts.
        for s in range(n - 1):
            send_c = chunks[(p - s) % n]
            recv_c = chunks[(p - s - 1) % n]
            works = []
            if send_c.numel():
                works.append(dist.isend(send_c, dst=nxt, group=self.group, tag=_TAG_RING_RS))
                sent += send_c.numel() * esize
            buf = scratch[: recv_c.numel()]
            if recv_c.numel():
                works.append(dist.irecv(buf, src=prv, group=self.group, tag=_TAG_RING_RS))
                received += recv_c.numel() * esize
            _wait_all(works)
            if recv_c.numel():
                recv_c.add_(buf)
        # chunk (p + 1) is now complete here: average it, then circulate the averages.
        chunks[(p + 1) % n].div_(n)
        for s in range(n - 1):
            send_c = chunks[(p + 1 - s) % n]
            recv_c = chunks[(p - s) % n]
            works = []
            if send_c.numel():
                works.append(dist.isend(send_c, dst=nxt, group=self.group, tag=_TAG_RING_AG))
                sent += send_c.numel() * esize
            if recv_c.numel():
                works.append(dist.irecv(recv_c, src=prv, group=self.group, tag=_TAG_RING_AG))
                received += recv_c.numel() * esize
            _wait_all(works)
        return sent, received

    def _star_allreduce(self, flat: torch.Tensor) -> tuple[int, int]:
        nbytes = flat.numel() * flat.element_size()
        others = [r for r in self.ranks if r != self.hub]
        if self.rank == self.hub:
            bufs = {r: torch.empty_like(flat) for r in others}
            works = [dist.irecv(bufs[r], src=r, group=self.group, tag=_TAG_STAR_UP) for r in others]
            _wait_all(works)
            for r in others:  # fixed order: the same sum whatever the arrival order
                flat.add_(bufs[r])
            flat.div_(self.size)
            works = [dist.isend(flat, dst=r, group=self.group, tag=_TAG_STAR_DOWN) for r in others]
            _wait_all(works)
            return len(others) * nbytes, len(others) * nbytes
        dist.isend(flat, dst=self.hub, group=self.group, tag=_TAG_STAR_UP).wait()
        dist.irecv(flat, src=self.hub, group=self.group, tag=_TAG_STAR_DOWN).wait()
        return nbytes, nbytes

    def _hierarchical_allreduce(self, flat: torch.Tensor) -> tuple[int, int]:
        cluster = self._cluster
        assert cluster is not None
        leader = cluster[0]
        if self._cluster_pg is not None:
            dist.reduce(flat, dst=leader, op=dist.ReduceOp.SUM, group=self._cluster_pg)
        if self.rank == leader:
            if self._leaders_pg is not None:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._leaders_pg)
            flat.div_(self.size)
        if self._cluster_pg is not None:
            dist.broadcast(flat, src=leader, group=self._cluster_pg)
        sent, received = self._allreduce_volume(flat.numel())
        esize = flat.element_size()
        return sent * esize, received * esize

    def _allgather_flat(self, flat: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        n = self.size
        p = self.position
        assert p is not None
        numel = flat.numel()
        esize = flat.element_size()
        table = torch.empty((n, numel), dtype=flat.dtype)
        table[p].copy_(flat)
        if n == 1 or numel == 0:
            return table, 0, 0
        if self.topology == "mesh":
            if self._group_order == self.ranks:
                dist.all_gather(list(table.unbind(0)), flat, group=self.group)
            else:  # all_gather fills in group-rank order; rows follow ``ranks``
                rows = [torch.empty_like(flat) for _ in self._group_order]
                dist.all_gather(rows, flat, group=self.group)
                for r, row in zip(self._group_order, rows):
                    table[self.ranks.index(r)].copy_(row)
            sent, received = self._allgather_volume(numel)
            return table, sent * esize, received * esize
        if self.topology == "ring":
            nxt = self.ranks[(p + 1) % n]
            prv = self.ranks[(p - 1) % n]
            for s in range(n - 1):
                works = [
                    dist.isend(table[(p - s) % n], dst=nxt, group=self.group, tag=_TAG_GATHER_RING),
                    dist.irecv(table[(p - s - 1) % n], src=prv, group=self.group, tag=_TAG_GATHER_RING),
                ]
                _wait_all(works)
            vol = (n - 1) * numel * esize
            return table, vol, vol
        if self.topology == "star":
            others = [r for r in self.ranks if r != self.hub]
            if self.rank == self.hub:
                works = [
                    dist.irecv(table[self.ranks.index(r)], src=r, group=self.group, tag=_TAG_GATHER_STAR_UP)
                    for r in others
                ]
                _wait_all(works)
                works = [
                    dist.isend(table, dst=r, group=self.group, tag=_TAG_GATHER_STAR_DOWN) for r in others
                ]
                _wait_all(works)
                return table, len(others) * n * numel * esize, len(others) * numel * esize
            dist.isend(flat, dst=self.hub, group=self.group, tag=_TAG_GATHER_STAR_UP).wait()
            dist.irecv(table, src=self.hub, group=self.group, tag=_TAG_GATHER_STAR_DOWN).wait()
            return table, numel * esize, n * numel * esize
        return self._hierarchical_allgather(flat, table)

    def _hierarchical_allgather(self, flat: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        cluster = self._cluster
        assert cluster is not None
        leader = cluster[0]
        numel = flat.numel()
        esize = flat.element_size()
        if self.rank == leader:
            gathered = [torch.empty_like(flat) for _ in self._cluster_pg_ranks]
            if self._cluster_pg is not None:
                dist.gather(flat, gather_list=gathered, dst=leader, group=self._cluster_pg)
            else:
                gathered[0].copy_(flat)
            gmax = max(len(c) for c in self.clusters)
            block = torch.zeros((gmax, numel), dtype=flat.dtype)
            for j, r in enumerate(cluster):
                block[j].copy_(gathered[self._cluster_pg_ranks.index(r)])
            if self._leaders_pg is not None:
                blocks = torch.empty((len(self.leaders), gmax, numel), dtype=flat.dtype)
                dist.all_gather(list(blocks.unbind(0)), block, group=self._leaders_pg)
            else:
                blocks = block.unsqueeze(0)
            pos = {r: i for i, r in enumerate(self.ranks)}
            leader_order = sorted(self.leaders)  # all_gather fills blocks in group-rank order
            for c in self.clusters:
                li = leader_order.index(c[0])
                for j, r in enumerate(c):
                    table[pos[r]].copy_(blocks[li, j])
        elif self._cluster_pg is not None:
            dist.gather(flat, gather_list=None, dst=leader, group=self._cluster_pg)
        if self._cluster_pg is not None:
            dist.broadcast(table, src=leader, group=self._cluster_pg)
        sent, received = self._allgather_volume(numel)
        return table, sent * esize, received * esize


# ---------------------------------------------------------------------- DDP hooks


class CommHookState:
    """State of a DDP communication hook made by :func:`make_ddp_hook`.

    Holds the reducer, the top-k error-feedback residuals (one per parameter, so they survive
    DDP rebuilding its buckets after the first iteration; one per bucket index and size for a
    bucket that does not name its parameters), the byte / time counters and the background
    communication thread used by the non-mesh topologies.
    """

    def __init__(self, reducer: TopologyReducer, compression: float | None = None) -> None:
        self.reducer = reducer
        self.compression = compression
        self.residuals: dict[tuple[Any, ...], torch.Tensor] = {}
        self.dense_bytes = 0
        self.sent_bytes = 0
        self.received_bytes = 0
        self.comm_seconds = 0.0
        self.buckets = 0
        self.dense_fallbacks = 0  # buckets sent dense because top-k would have moved more bytes
        # GPU buckets on the mesh path: (start, end) CUDA events, read when stats() is asked.
        self._gpu_spans: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Callable[[], torch.Tensor], torch.futures.Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failure: BaseException | None = None

    # counters ---------------------------------------------------------------

    def _record(self, dense: int, sent: int, received: int, seconds: float) -> None:
        with self._lock:
            self.dense_bytes += int(dense)
            self.sent_bytes += int(sent)
            self.received_bytes += int(received)
            self.comm_seconds += seconds
            self.buckets += 1

    def stats(self) -> dict[str, float]:
        """Measured totals for this rank since the hook was made.

        ``dense_bytes``: bytes this rank would have sent exchanging the same buckets densely
        along the topology (:meth:`TopologyReducer.dense_bytes_for`); ``sent_bytes``: bytes it
        did send; ``bytes_saved = dense_bytes - sent_bytes`` (0 without compression);
        ``comm_seconds``: summed over buckets; on the mesh path from launching a bucket's async
        collective to its averaged gradient (overlapping backward computation and, possibly,
        other buckets), on the thread path the time the thread spent on the bucket (plus the
        top-k selection when compressing). A GPU bucket on the mesh path is timed on its CUDA
        stream, from the gradient being ready to the averaged result (its future completes at
        launch, so host time would read near zero).
        """
        with self._lock:
            for began, ended in self._gpu_spans:
                ended.synchronize()
                self.comm_seconds += began.elapsed_time(ended) / 1000.0
            self._gpu_spans.clear()
            return {
                "dense_bytes": self.dense_bytes,
                "sent_bytes": self.sent_bytes,
                "bytes_saved": self.dense_bytes - self.sent_bytes,
                "received_bytes": self.received_bytes,
                "comm_seconds": self.comm_seconds,
                "buckets": self.buckets,
                "dense_fallback_buckets": self.dense_fallbacks,
            }

    # background thread --------------------------------------------------------

    def submit(self, fn: Callable[[], torch.Tensor]) -> torch.futures.Future:
        """Queue ``fn`` on the communication thread; the future gets its result or exception."""
        fut: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._closed:
                fut.set_exception(RuntimeError("the communication hook was closed; make a new one"))
                return fut
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"comm-{self.reducer.topology}", daemon=True
                )
                self._thread.start()
            self._queue.put((fn, fut))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if self._failure is not None:
                # Peers expect messages in bucket order; after a failure this rank's traffic is
                # out of step, so fail fast instead of exchanging with the wrong bucket.
                fut.set_exception(
                    RuntimeError(f"communication stopped after an earlier failure: {self._failure}")
                )
                continue
            try:
                result = fn()
            except BaseException as exc:  # surfaced through the future, so backward raises
                self._failure = exc
                log.error("rank %d: %s bucket exchange failed: %s", self.reducer.rank, self.reducer.topology, exc)
                fut.set_exception(exc)
                continue
            fut.set_result(result)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the communication thread after the queued buckets; later hook calls fail."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("communication thread did not stop within %.0f s", timeout)

    def __enter__(self) -> CommHookState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cuda_event(t: torch.Tensor) -> Any:
    """A timing event recorded now on ``t``'s current CUDA stream; None for a CPU tensor."""
    if not t.is_cuda:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(t.device))
    return event


def _done_future(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _residual_slots(bucket: Any, numel: int) -> list[tuple[tuple[Any, ...], int]]:
    """Residual keys and sizes covering a bucket's flat buffer, in buffer order.

    One slot per parameter when the bucket names its parameters (the buffer is their gradients
    concatenated in that order), so a residual follows its parameter when DDP rebuilds its
    buckets; otherwise one slot for the whole bucket, keyed by its index and size.
    """
    try:
        params = list(bucket.parameters())
    except Exception:  # not a dist.GradBucket (or no parameters attached)
        params = []
    if params and sum(p.numel() for p in params) == numel:
        return [(("param", id(p)), p.numel()) for p in params]
    return [(("bucket", int(bucket.index()), numel), numel)]


def _topk_pack(state: CommHookState, bucket: Any, buf: torch.Tensor,
               ratio: float) -> tuple[torch.Tensor, int, torch.dtype]:
    """Error feedback + top-k: returns (packed bytes, k, index dtype) and updates the residuals."""
    numel = buf.numel()
    acc = buf.detach().reshape(-1).clone()
    slots = _residual_slots(bucket, numel)
    offset = 0
    for key, n in slots:
        residual = state.residuals.get(key)
        if residual is not None and residual.numel() == n and residual.dtype == acc.dtype:
            acc[offset : offset + n].add_(residual)
        offset += n
    k = min(numel, max(1, int(ratio * numel)))
    idx = acc.abs().topk(k, sorted=False).indices
    values = acc[idx]
    acc.index_fill_(0, idx, 0)  # what this rank did not contribute stays for the next step
    offset = 0
    for key, n in slots:
        state.residuals[key] = acc[offset : offset + n]
        offset += n
    idx_dtype = torch.int32 if numel < 2**31 else torch.int64
    packed = torch.cat([values.contiguous().view(torch.uint8), idx.to(idx_dtype).view(torch.uint8)])
    return packed, k, idx_dtype


def topk_payload_bytes(numel: int, element_size: int, ratio: float) -> int:
    """Bytes of one rank's top-k part of a bucket: k values and k indices (int32 below 2**31 entries)."""
    k = min(numel, max(1, int(ratio * numel)))
    return k * (element_size + (4 if numel < 2**31 else 8))


def sparse_pays(topology: str, ranks: int, numel: int, element_size: int, ratio: float) -> bool:
    """Whether exchanging top-k parts moves fewer bytes over the whole group than a dense all-reduce.

    Every rank decides alike (no rank-dependent figure): a dense all-reduce moves about
    2 (n-1) x the bucket in total; gathering the parts moves n (n-1) parts along a mesh, ring or
    hierarchy (counted as a ring), (n+1) (n-1) through a star's hub. With int32 indices, ratio
    0.5 never pays; on 4 ranks top-k pays below a ratio of 1/4."""
    if ranks <= 1:
        return False
    part = topk_payload_bytes(numel, element_size, ratio)
    gathered = (ranks + 1 if topology == "star" else ranks) * part
    return gathered < 2 * numel * element_size


def _fold_residuals(state: CommHookState, bucket: Any, buf: torch.Tensor) -> None:
    """Add the error-feedback residuals into ``buf`` and drop them (a dense exchange sends it all)."""
    flat = buf.view(-1)
    offset = 0
    for key, n in _residual_slots(bucket, buf.numel()):
        residual = state.residuals.pop(key, None)
        if residual is not None and residual.numel() == n and residual.dtype == flat.dtype:
            flat[offset : offset + n].add_(residual)
        offset += n


def _sparse_sum_mean(table: torch.Tensor, k: int, idx_dtype: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    """Sum every rank's (values, indices) row of ``table`` into ``buf`` densely, divide by ranks."""
    vbytes = k * buf.element_size()
    out = torch.zeros(buf.numel(), dtype=buf.dtype)
    for row in table.unbind(0):  # rank order: identical sums on every rank
        values = row[:vbytes].clone().view(buf.dtype)
        idx = row[vbytes:].clone().view(idx_dtype).long()
        out.index_add_(0, idx, values)
    out.div_(table.shape[0])
    buf.copy_(out.view(buf.shape))
    return buf


def make_ddp_hook(
    reducer: TopologyReducer, compression: float | None = None
) -> tuple[CommHookState, Callable[[CommHookState, Any], torch.futures.Future]]:
    """Returns ``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``.

    The DDP model must use the reducer's ranks as its process group (``process_group=
    reducer.group`` or the default group when the reducer spans all ranks); the hook
    averages each gradient bucket over them.

    * ``mesh``, no compression: an async ``dist.all_reduce`` whose future is chained with the
      division, so gloo reduces a bucket while backward computes the next ones.
    * ``ring`` / ``star`` / ``hierarchical``: the bucket is queued to one background
      communication thread that runs :meth:`TopologyReducer.allreduce_mean` on the buckets in
      order (DDP launches buckets in index order on every rank); the hook returns at once with
      a ``torch.futures.Future`` that the thread completes. An exception in the exchange (a
      dead peer, a timeout) is set on the future, so ``backward()`` raises instead of hanging,
      and later buckets fail fast. Call ``state.close()`` when done with the model.
    * ``compression=r`` (top-k, ``0 < r <= 1``): per bucket, the error-feedback residual is
      added, the ``k = max(1, int(r * numel))`` largest-magnitude entries are kept and only
      their (value, int32 index) pairs are exchanged, when that moves fewer bytes than dense
      (``sparse_pays``; otherwise the bucket plus its residual goes dense): mesh with an async ``dist.all_gather``
      of the fixed-size packed parts; ring / star / hierarchical with
      :meth:`TopologyReducer.allgather` on the communication thread (the packed parts travel
      along the topology: around the ring, through the hub, or via cluster leaders). Every
      rank sums all parts into a dense tensor and divides by the number of ranks; the
      residual becomes ``(grad + old residual) - what this rank contributed``. With a single
      rank nothing is exchanged and the gradient is left as is.

    ``state.stats()`` reports ``dense_bytes``, ``sent_bytes``, ``bytes_saved`` and
    ``comm_seconds`` measured on this rank.
    """
    compression = _checked_compression(compression)
    state = CommHookState(reducer, compression)
    if compression is not None:
        hook = _staged_on_cpu(_topk_hook)
    elif reducer.topology == "mesh":
        hook = _dense_mesh_hook  # a GPU bucket goes straight to NCCL
    else:
        hook = _staged_on_cpu(_dense_thread_hook)
    return state, hook


def _checked_compression(compression: float | None) -> float | None:
    """The top-k ratio as a float in (0, 1], or None; anything else is a ValueError."""
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, (int, float)):
            raise ValueError(f"compression must be a top-k ratio in (0, 1] or None, got {compression!r}")
        compression = float(compression)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be a top-k ratio in (0, 1], got {compression}")
    return compression


# The hooks carry no annotations: DDP accepts only a missing annotation or the
# dist.GradBucket / Future[Tensor] objects themselves, and this module's annotations are
# strings (``from __future__ import annotations``).
def _dense_mesh_hook(st, bucket):  # type: ignore[no-untyped-def]
    buf = bucket.buffer()
    red = st.reducer
    if red.size == 1:
        st._record(0, 0, 0, 0.0)
        return _done_future(buf)
    sent, received = red.dense_bytes_for(buf.numel(), buf.element_size())
    start = time.perf_counter()
    began = _cuda_event(buf)
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=red.group, async_op=True)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        out = fut.value()[0].div_(red.size)
        if began is not None:  # NCCL: time it on the stream, read in stats()
            ended = _cuda_event(out)
            red._account(sent, received, 0.0)
            st._record(sent, sent, received, 0.0)
            with st._lock:
                st._gpu_spans.append((began, ended))
            return out
        seconds = time.perf_counter() - start
        red._account(sent, received, seconds)
        st._record(sent, sent, received, seconds)
        return out

    return work.get_future().then(finish)


def _dense_thread_hook(st, bucket):  # type: ignore[no-untyped-def]
    buf = bucket.buffer()
    red = st.reducer
    if red.size == 1:
        st._record(0, 0, 0, 0.0)
        return _done_future(buf)
    dense, received = red.dense_bytes_for(buf.numel(), buf.element_size())

    def job() -> torch.Tensor:
        start = time.perf_counter()
        red.allreduce_mean(buf)
        st._record(dense, dense, received, time.perf_counter() - start)
        return buf

    return st.submit(job)


def _topk_hook(st, bucket):  # type: ignore[no-untyped-def]
    buf = bucket.buffer()
    red = st.reducer
    if red.size == 1:
        st._record(0, 0, 0, 0.0)
        return _done_future(buf)
    assert st.compression is not None
    if not sparse_pays(red.topology, red.size, buf.numel(), buf.element_size(), st.compression):
        _fold_residuals(st, bucket, buf)  # dense carries everything: nothing is left over
        with st._lock:
            st.dense_fallbacks += 1
        return (_dense_mesh_hook if red.topology == "mesh" else _dense_thread_hook)(st, bucket)
    dense, _ = red.dense_bytes_for(buf.numel(), buf.element_size())
    start = time.perf_counter()
    packed, k, idx_dtype = _topk_pack(st, bucket, buf, st.compression)
    sent, received = red.gather_bytes_for(packed.numel(), packed.element_size())
    if red.topology == "mesh":
        table = torch.empty((red.size, packed.numel()), dtype=packed.dtype)
        work = dist.all_gather(list(table.unbind(0)), packed, group=red.group, async_op=True)

        def finish(fut: torch.futures.Future) -> torch.Tensor:
            fut.value()
            out = _sparse_sum_mean(table, k, idx_dtype, buf)
            seconds = time.perf_counter() - start
            red._account(sent, received, seconds)
            st._record(dense, sent, received, seconds)
            return out

        return work.get_future().then(finish)

    pack_seconds = time.perf_counter() - start

    def job() -> torch.Tensor:
        job_start = time.perf_counter()
        table = red.allgather(packed)
        out = _sparse_sum_mean(table, k, idx_dtype, buf)
        st._record(dense, sent, received, pack_seconds + time.perf_counter() - job_start)
        return out

    return st.submit(job)


class _CpuBucket:
    """A GPU gradient bucket seen through a CPU copy of its buffer."""

    def __init__(self, bucket: Any, buffer: torch.Tensor) -> None:
        self._bucket, self._buffer = bucket, buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> Any:
        return self._bucket.parameters()

    def index(self) -> int:
        return int(self._bucket.index())


def _staged_on_cpu(
        hook: Callable[[CommHookState, Any], torch.futures.Future],
) -> Callable[[CommHookState, Any], torch.futures.Future]:
    """The point-to-point schedules (ring, star, hierarchical) and the top-k exchange are
    written for CPU tensors over gloo: a GPU bucket is copied to CPU, exchanged there, and the
    result copied back into the bucket. CPU buckets pass straight through."""

    def staged(st, bucket):  # type: ignore[no-untyped-def]
        buf = bucket.buffer()
        if not buf.is_cuda:
            return hook(st, bucket)

        def back(fut: torch.futures.Future) -> torch.Tensor:
            return buf.copy_(fut.value())

        return hook(st, _CpuBucket(bucket, buf.cpu())).then(back)

    return staged
