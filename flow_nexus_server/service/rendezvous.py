"""Where a cluster's rendezvous store lives: on its first node, never in the controller.

The first node in rank order hosts the cluster's c10d ``TCPStore`` (``workers.rendezvous``,
the node's ``POST /store``), as torchrun's agent hosts it, so a running group keeps its store
when the controller dies and the controller holds no socket of its own for it. Before a group
is formed the controller asks that node for the store's address: the node keeps its store
across generations, and a new first node (the old one died or was removed) starts a new one.
The address is kept in the cluster row (``store_host``, ``store_port``); the port is asked
for again next time, so the address stays the same while it is free.

By default the store listens where the node's control API listens: 127.0.0.1 for nodes on
this host, the machine's address for a Ray actor on another one. For a cluster that spans
machines set ``FLOW_NEXUS_ADVERTISE_HOST`` to an address of this host that the other
machines reach: a first node that listens on loopback (so it runs on this host) then binds
its store on ``FLOW_NEXUS_RENDEZVOUS_BIND`` (default ``0.0.0.0``) and nodes are told that
address. The store has no authentication: let only the cluster's hosts reach its port.
"""

from __future__ import annotations

from flow_nexus_server.config import Settings
from flow_nexus_server.service.node_client import NodeClient
from workers import protocol as p

ADVERTISE_ENV = "FLOW_NEXUS_ADVERTISE_HOST"
BIND_ENV = "FLOW_NEXUS_RENDEZVOUS_BIND"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def store_request(node_host: str | None, previous_port: int | None, settings: Settings) -> p.StoreRequest:
    """What to ask a first node listening on ``node_host`` for (see the module docstring)."""
    advertise = settings.advertise_host
    if advertise and advertise not in LOOPBACK_HOSTS and (node_host or "127.0.0.1") in LOOPBACK_HOSTS:
        return p.StoreRequest(port=previous_port, bind_host=settings.rendezvous_bind, advertise_host=advertise)
    return p.StoreRequest(port=previous_port)


def store_on_first_node(client: NodeClient, node_host: str | None, previous_port: int | None,
                        settings: Settings) -> tuple[str, int]:
    """(host, port) of the store the first node hosts, started there if it hosts none yet.

    Raises NodeRequestError when the node cannot be reached or cannot listen."""
    reply = client.host_store(store_request(node_host, previous_port, settings))
    return reply.host, reply.port
