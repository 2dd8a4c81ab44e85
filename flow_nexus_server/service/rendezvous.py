"""One TCPStore per cluster, hosted by the server: the control plane nodes rendezvous through.

By default the store listens on 127.0.0.1 only and nodes are told to reach it there, which is
right while every node runs on this host. For nodes on other hosts set
``FLOW_NEXUS_ADVERTISE_HOST`` to an address of this host that they can reach: the store then
listens on all interfaces (``0.0.0.0``, or ``FLOW_NEXUS_RENDEZVOUS_BIND`` when set) and that
address is what nodes are told. The port is chosen by the OS (or reused after a restart).
The store has no authentication: let only the cluster's hosts reach its port.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

ADVERTISE_ENV = "FLOW_NEXUS_ADVERTISE_HOST"
BIND_ENV = "FLOW_NEXUS_RENDEZVOUS_BIND"
LOOPBACK = "127.0.0.1"


def _listening_socket(bind_host: str, port: int) -> socket.socket:
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


class Rendezvous:
    """Hosts the clusters' stores; torch is imported on first use only.

    ``host`` is the address nodes are told (default: ``FLOW_NEXUS_ADVERTISE_HOST``, else
    127.0.0.1); ``bind_host`` the address the store listens on (default: 127.0.0.1 when
    advertising loopback, else ``FLOW_NEXUS_RENDEZVOUS_BIND`` or 0.0.0.0).
    """

    def __init__(self, host: str | None = None, bind_host: str | None = None) -> None:
        self.host = host or os.environ.get(ADVERTISE_ENV, "").strip() or LOOPBACK
        loopback = self.host in (LOOPBACK, "localhost", "::1")
        default_bind = ("::1" if self.host == "::1" else LOOPBACK) if loopback else \
            (os.environ.get(BIND_ENV, "").strip() or "0.0.0.0")
        self.bind_host = bind_host or default_bind
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def address(self, cluster_id: str, port: int | None = None) -> tuple[str, int]:
        """The (host, port) of the cluster's store, starting it (on ``port`` if given) if needed."""
        with self._lock:
            store = self._stores.get(cluster_id)
            if store is None:
                import torch.distributed as dist

                # Bound here, so the store listens only where asked (TCPStore alone binds every
                # interface); the store takes over the socket and closes it when released.
                sock = _listening_socket(self.bind_host, port or 0)
                bound_port = sock.getsockname()[1]
                store = dist.TCPStore(self.host, bound_port, is_master=True, wait_for_workers=False,
                                      timeout=timedelta(seconds=60), master_listen_fd=sock.detach())
                self._stores[cluster_id] = store
                log.info("rendezvous store for %s on %s:%d (listening on %s)", cluster_id, self.host,
                         store.port, self.bind_host)
            return self.host, store.port

    def close(self, cluster_id: str) -> None:
        with self._lock:
            self._stores.pop(cluster_id, None)  # the store shuts down when released

    def close_all(self) -> None:
        with self._lock:
            self._stores.clear()
