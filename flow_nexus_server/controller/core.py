"""The services that own the work, started once for a state home: clusters and their nodes,
training sessions, serving, the node monitor, and the event notices MCP subscribers get.

In the controller process (``controller.daemon``) one ``Controller`` lives as long as the process
and every front-end connection shares it. In-process (the tests' ``Client(build_server(...))``)
the MCP server's lifespan makes one and closes it, stopping its nodes, when the client leaves.
"""

from __future__ import annotations

import logging

import anyio
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from sqlalchemy import select

from flow_nexus_server import __version__
from flow_nexus_server.config import Settings
from flow_nexus_server.registry.service import RegistryService
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.inference import InferenceService
from flow_nexus_server.service.monitor import NodeMonitor
from flow_nexus_server.service.training import TrainingService
from flow_nexus_server.states import ClusterState
from flow_nexus_server.store import Cluster

log = logging.getLogger(__name__)

EVENT_POLL_S = 0.5  # how often new events are looked for (resource-updated notices)
MAX_BACKOFF_S = 30.0  # longest wait between retries of a failing background loop


class Controller:
    def __init__(self, settings: Settings, clusters: ClusterService | None = None,
                 bus: InMemorySubscriptionBus | None = None) -> None:
        self.settings = settings
        self.clusters = clusters or ClusterService(settings)
        self.training = TrainingService(self.clusters)
        self.inference = InferenceService(self.clusters)
        self.registry = RegistryService(self.inference, self.training)
        self.monitor = NodeMonitor(self.clusters)
        self.bus = bus or InMemorySubscriptionBus()
        self._closed = False

    async def start(self) -> None:
        """Re-attach what an earlier controller left running, then watch it."""
        await anyio.to_thread.run_sync(self.clusters.recover)
        await anyio.to_thread.run_sync(self.training.recover)
        self.monitor.start()
        log.info("flow-nexus-server %s ready; state home %s", __version__, self.settings.home)

    async def aclose(self, *, stop_nodes: bool) -> None:
        """Stop watching; with ``stop_nodes`` also stop every node (in-process servers). The
        controller process leaves nodes running: a later controller re-attaches them, and their
        lease ends them if none ever comes."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if stop_nodes:  # sessions end 'stopped' and clusters 'terminated': no state left untrue
                await anyio.to_thread.run_sync(self._terminate_all)
            self.monitor.stop()
            self.training.close()
            await anyio.to_thread.run_sync(lambda: self.clusters.close(stop_nodes=stop_nodes))
        log.info("flow-nexus-server stopped%s", "" if stop_nodes else " (nodes left running)")

    def _terminate_all(self) -> None:
        with self.clusters.store.session() as s:
            ids = list(s.scalars(select(Cluster.id).where(Cluster.status != ClusterState.TERMINATED)))
        for cluster_id in ids:
            try:
                if self.clusters.store.nodes(cluster_id):
                    self.training.terminate_cluster(cluster_id)
            except Exception:
                log.exception("stopping cluster %s at shutdown failed", cluster_id)

    async def publish_event_updates(self) -> None:
        """Tell subscribers of session://{id}/events when that session has new events.

        A failure (a damaged database) is logged and retried with a back-off; only the
        notifications stop meanwhile, never the server."""
        last: int | None = None  # None until the first read: events from before the start are not news
        delay = EVENT_POLL_S
        while True:
            try:
                top, sessions = await anyio.to_thread.run_sync(self.clusters.store.new_event_sessions, last or 0)
                if last is not None:
                    for sid in sessions:
                        await self.bus.publish(ResourceUpdated(uri=f"session://{sid}/events"))
                last, delay = top, EVENT_POLL_S
            except Exception:
                delay = min(delay * 2, MAX_BACKOFF_S)
                log.exception("publishing session event notices failed; retrying in %.0f s", delay)
            await anyio.sleep(delay)
