"""One TCPStore per cluster, hosted by the server: the control plane nodes rendezvous through."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)


class Rendezvous:
    """Hosts the clusters' stores; torch is imported on first use only."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def address(self, cluster_id: str, port: int | None = None) -> tuple[str, int]:
        """The (host, port) of the cluster's store, starting it (on ``port`` if given) if needed."""
        with self._lock:
            store = self._stores.get(cluster_id)
            if store is None:
                import torch.distributed as dist

                store = dist.TCPStore(self.host, port or 0, is_master=True, wait_for_workers=False,
                                      timeout=timedelta(seconds=60))
                self._stores[cluster_id] = store
                log.info("rendezvous store for %s on %s:%d", cluster_id, self.host, store.port)
            return self.host, store.port

    def close(self, cluster_id: str) -> None:
        with self._lock:
            self._stores.pop(cluster_id, None)  # the store shuts down when released

    def close_all(self) -> None:
        with self._lock:
            self._stores.clear()
