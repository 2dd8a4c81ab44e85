"""Group manager: forms a cluster's process group (connect, re-form after a membership change),
with the rendezvous store on the first node, and measures its links.

A mixin of ``ClusterService`` (``service.clusters``): it uses the service's store, node clients,
locks and events.
"""

from __future__ import annotations

import logging
import statistics

from flow_nexus_server import replies as r
from flow_nexus_server.service.backend import NodeGpus, choose_backend, local_ranks
from flow_nexus_server.service.errors import Conflict, NextStep, ServiceError
from flow_nexus_server.service.node_client import NodeRequestError
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.rendezvous import store_on_first_node
from flow_nexus_server.service.topology import edges as topology_edges
from flow_nexus_server.states import ClusterState, move
from flow_nexus_server.store import Cluster, Node
from workers import protocol as p

log = logging.getLogger(__name__)

# Ranks: the roles that coordinate come first, so the aggregator / parameter server is rank 0.
ROLE_RANK_ORDER = {"aggregator": 0, "parameter_server": 1, "validator": 2, "worker": 3}


class GroupManager:
    # ----------------------------------------------------------------- connect
    def connect(self, cluster_id: str, topology: str | None = None) -> r.ConnectReply:
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            nodes = self.store.nodes(cluster_id)
            if not nodes:
                raise ServiceError(
                    f"cluster {cluster_id} has no nodes", next_step=NextStep.DEPLOY)
            if cluster.status == ClusterState.TRAINING:
                raise Conflict(f"cluster {cluster_id} is training; stop the session before reconnecting")
            return self._form_group(cluster, nodes, topology or cluster.topology)

    def reform(self, cluster_id: str) -> r.ConnectReply:
        """Re-form the group over the live nodes (new generation), whatever the cluster is doing."""
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            nodes = self.store.nodes(cluster_id)
            if not nodes:
                raise ServiceError(f"cluster {cluster_id} has no live node left to form a group")
            return self._form_group(cluster, nodes, cluster.connected_topology or cluster.topology)

    def _form_group(self, cluster: Cluster, nodes: list[Node], topology: str) -> r.ConnectReply:
        ordered = sorted(nodes, key=lambda n: (ROLE_RANK_ORDER.get(n.role, 9), n.seq))
        generation = cluster.generation + 1
        host, port = self._store_address(cluster, ordered[0], generation)
        world = len(ordered)
        backend, why = choose_backend(cluster.options.get("backend_requested", "auto"), [
            NodeGpus(n.id, n.host, n.options.get("cuda_devices", 0), n.options.get("cuda_visible")) for n in ordered])
        local = local_ranks([n.host for n in ordered])

        def join(item: tuple[int, Node]) -> p.JoinReply:
            rank, node = item
            req = p.JoinRequest(
                generation=generation, rank=rank, world_size=world, store_host=host, store_port=port,
                store_prefix=f"{cluster.id}/g{generation}", backend=backend, local_rank=local[rank],
                timeout_s=self.settings.group_timeout_s,
            )
            return self.client(cluster, node).join(req)

        joined = parallel(join, enumerate(ordered))
        errors = [f"{n.id}: {res}" for n, res in zip(ordered, joined) if isinstance(res, BaseException)]
        if errors:
            self._mark_needs_connect(cluster, generation, "forming the group failed: " + "; ".join(errors))
            raise ServiceError(
                f"forming generation {generation} of cluster {cluster.id} failed: {'; '.join(errors)}",
                next_step=NextStep.CHECK_NODES)
        for node, reply in zip(ordered, joined):
            self.telemetry.note_group(node.id, reply.group)  # type: ignore[union-attr]
        edge_list = topology_edges(topology, world)
        probe = p.ProbeRequest(generation=generation, edges=edge_list)
        probed = parallel(lambda n: self.client(cluster, n).probe(probe), ordered)
        errors = [f"{n.id}: {res}" for n, res in zip(ordered, probed) if isinstance(res, BaseException)]
        if errors:
            self._mark_needs_connect(cluster, generation, "measuring links failed: " + "; ".join(errors))
            raise ServiceError(f"measuring the links of cluster {cluster.id} failed: {'; '.join(errors)}")
        measured = {(m.src, m.dst): m for reply in probed for m in reply.edges}  # type: ignore[union-attr]
        out_edges = []
        for a, b in edge_list:
            m = measured.get((a, b))
            if m is None:
                raise ServiceError(f"no measurement came back for edge {a}->{b}; reconnect the cluster")
            out_edges.append(r.Edge(**{"from": a}, to=b, from_node=ordered[a].id, to_node=ordered[b].id,
                                    status="active", latency_ms=round(m.rtt_ms, 4),
                                    bandwidth_mbps=round(m.bandwidth_mbps, 2)))
        lat = [e.latency_ms for e in out_edges]
        bw = [e.bandwidth_mbps for e in out_edges]
        health = r.NetworkHealth(
            avg_latency_ms=statistics.fmean(lat) if lat else None, max_latency_ms=max(lat) if lat else None,
            avg_bandwidth_mbps=statistics.fmean(bw) if bw else None, min_bandwidth_mbps=min(bw) if bw else None,
        )
        with self.store.session() as s:
            for rank, node in enumerate(ordered):
                row = s.get(Node, node.id)
                row.rank, row.generation = rank, generation
            c = s.get(Cluster, cluster.id)
            move(c, ClusterState.CONNECTED)
            c.generation, c.connected_topology = generation, topology
            c.needs_connect_reason, c.store_host, c.store_port = None, host, port
            c.backend = backend
            c.options = {**c.options, "network": {**health.model_dump(), "edges": len(out_edges)}}
        cluster.generation, cluster.backend = generation, backend
        self.event(cluster.id, "group_formed",
                   f"generation {generation}: {world} node(s) joined over {backend} ({why}), "
                   f"{topology} with {len(out_edges)} edge(s)",
                   data={"generation": generation, "topology": topology, "backend": backend,
                         "store": f"{host}:{port}", "store_node": ordered[0].id})
        return r.ConnectReply(
            success=True, cluster_id=cluster.id, topology=topology, backend=backend, generation=generation,
            connections=len(out_edges), nodes_connected=world,
            ranks=[r.RankInfo(node_id=n.id, rank=i, role=n.role) for i, n in enumerate(ordered)],
            edges=out_edges, network_health=health,
            join_ms_max=max(j.join_ms for j in joined),  # type: ignore[union-attr]
        )

    def _store_address(self, cluster: Cluster, first: Node, generation: int) -> tuple[str, int]:
        """The rendezvous store's address, hosted by the first node in rank order (which keeps the store
        it has; a new first node starts one): the controller holds no store, so training outlives it."""
        try:
            return store_on_first_node(self.client(cluster, first), first.host, cluster.store_port,
                                       self.settings)
        except NodeRequestError as exc:
            self._mark_needs_connect(cluster, generation, f"the first node could not host the rendezvous store: {exc}")
            raise ServiceError(
                f"forming generation {generation} of cluster {cluster.id} failed: the first node could not host "
                f"the rendezvous store ({exc})", next_step=NextStep.CHECK_NODES) from exc

    def _mark_needs_connect(self, cluster: Cluster, generation: int, reason: str) -> None:
        with self.store.session() as s:
            c = s.get(Cluster, cluster.id)
            move(c, ClusterState.NEEDS_CONNECT)
            c.generation, c.needs_connect_reason = generation, reason
        cluster.generation = generation
        self.event(cluster.id, "group_failed", reason)

    def _after_membership_change(self, cluster_id: str, what: str) -> r.GroupChange:
        """Deploy/remove on a connected cluster re-forms the group; otherwise records the state."""
        cluster = self.get_cluster(cluster_id)
        nodes = self.store.nodes(cluster_id)
        if cluster.status == ClusterState.CONNECTED and nodes:
            try:
                reply = self._form_group(cluster, nodes, cluster.connected_topology or cluster.topology)
            except ServiceError as exc:
                return r.GroupChange.pending("needs_connect", cluster.generation,
                                             f"{what}; re-forming the group failed ({exc})",
                                             exc.next_step or NextStep.CONNECT)
            return r.GroupChange(action="reformed", generation=reply.generation,
                                 message=f"{what}; the group was re-formed as generation {reply.generation}")
        if cluster.status == ClusterState.TRAINING and nodes and any(
                listener(cluster_id, what) for listener in self.on_training_membership):
            return r.GroupChange(action="at_next_boundary", generation=cluster.generation,
                                 message=f"{what}; the running session re-forms its group with the new node(s) at "
                                         "its next epoch / round boundary and resumes from its state there")
        if not nodes:
            self.store.update(Cluster, cluster_id, status=ClusterState.INITIALIZING, needs_connect_reason=None)
            return r.GroupChange(action="none", generation=cluster.generation, message=f"{what}; no nodes left")
        if cluster.status == ClusterState.INITIALIZING:
            self.store.update(Cluster, cluster_id, status=ClusterState.READY)
            return r.GroupChange.pending("none", cluster.generation, what, NextStep.CONNECT)
        if cluster.status == ClusterState.NEEDS_CONNECT:
            return r.GroupChange.pending("needs_connect", cluster.generation, what, NextStep.CONNECT)
        return r.GroupChange(action="none", generation=cluster.generation, message=what)

    def collective_benchmark(self, cluster_id: str, request: dict | None = None) -> list[r.CollectiveFigure]:
        """Collective time and bandwidth per topology and message size, across the live group: the averaging
        all-reduce at the default sizes, or what ``request`` (fields of ``CollectiveBenchRequest``) asks."""
        with self.lock(cluster_id):
            cluster = self.get_cluster(cluster_id)
            if cluster.status != ClusterState.CONNECTED:
                raise ServiceError(f"cluster {cluster_id} is {cluster.status}; connect it (and let training finish) "
                                   "before benchmarking its links")
            nodes = sorted(self.store.nodes(cluster_id), key=lambda n: n.rank if n.rank is not None else 1 << 30)
            req = p.CollectiveBenchRequest(**(request or {}), generation=cluster.generation)
            replies = parallel(lambda n: self.client(cluster, n).bench_collectives(req), nodes)
            errors = [f"{n.id}: {e}" for n, e in zip(nodes, replies) if isinstance(e, BaseException)]
            if errors:
                raise ServiceError("the all-reduce benchmark failed on " + "; ".join(errors))
            figures = []
            for i, first in enumerate(replies[0].results):  # type: ignore[union-attr]
                slowest = max(rep.results[i].median_ms for rep in replies)  # type: ignore[union-attr]
                figures.append(r.CollectiveFigure(topology=first.topology, op=first.op, bytes=first.bytes,
                                                  time_ms=slowest,
                                                  algbw_mbps=first.bytes * 8 / (slowest / 1000) / 1e6,
                                                  world_size=len(nodes)))
            return figures
