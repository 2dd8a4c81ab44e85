"""The cluster's rendezvous store, hosted by a node's agent (as torchrun's agent hosts it).

The first node in rank order hosts the c10d ``TCPStore`` every node of its cluster joins
through, so the store lives as long as that node, not as long as the controller: a running
group keeps its store (heartbeats, long waits, new sub-groups) when the controller dies.

The store listens where the node's control API listens (loopback for a node on the
controller's host, the machine's address for a Ray actor on another one) unless the
controller asks for another address (``FLOW_NEXUS_ADVERTISE_HOST``, see docs/multi-host.md).
Its port is one the OS picks, or the one used before when it is free. The node keeps the
store for its whole life and hands it out again for every generation (each generation has its
own ``PrefixStore`` prefix). The store has no authentication: let only the cluster's hosts
reach its port.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import Any

from workers.protocol import StoreReply, StoreRequest

log = logging.getLogger(__name__)

# Bounds the host object's own connection to its advertised address, so an address that does not
# reach this machine fails the request (in about twice this, with torch's retry); nodes join
# through clients with their own timeout.
STORE_TIMEOUT = timedelta(seconds=5)


def listening_socket(bind_host: str, port: int) -> socket.socket:
    """A socket listening on ``bind_host:port`` (0: a port the OS picks)."""
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def bind_preferring(bind_host: str, port: int | None) -> socket.socket:
    """Listen on ``port`` when it is free, else on a port the OS picks."""
    if port:
        try:
            return listening_socket(bind_host, port)
        except OSError as exc:
            log.info("port %d on %s is not free for the rendezvous store (%s); letting the OS pick one",
                     port, bind_host, exc)
    return listening_socket(bind_host, 0)


class HostedStore:
    """The store this node hosts for its cluster: started on the first request, then kept."""

    def __init__(self, control_host: str) -> None:
        self.control_host = control_host
        self._store: Any = None
        self._where: tuple[str, str] | None = None  # (bind host, advertised host) of _store
        self._lock = threading.Lock()

    def ensure(self, req: StoreRequest) -> StoreReply:
        """The store's address, starting the store when this node hosts none (or none where asked).

        Raises OSError when it cannot listen where asked."""
        bind = req.bind_host or self.control_host
        advertise = req.advertise_host or bind
        with self._lock:
            if self._store is not None and self._where == (bind, advertise):
                return StoreReply(host=advertise, port=self._store.port, reused=True)
            # Started before the old one goes, so a request that fails changes nothing; asked to
            # listen elsewhere, the old store goes (its groups are being re-formed anyway).
            self._store, self._where = self._start(bind, advertise, req.port), (bind, advertise)
            log.info("hosting the rendezvous store on %s:%d (listening on %s)", advertise, self._store.port, bind)
            return StoreReply(host=advertise, port=self._store.port, reused=False)

    @staticmethod
    def _start(bind: str, advertise: str, port: int | None) -> Any:
        import torch.distributed as dist

        # Bound here, so the store listens only where asked (TCPStore alone binds every
        # interface); the store takes over the socket and closes it when released.
        sock = bind_preferring(bind, port)
        return dist.TCPStore(advertise, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                             timeout=STORE_TIMEOUT, master_listen_fd=sock.detach())
