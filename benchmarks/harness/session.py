"""The benchmark's MCP client session: tool calls and the clusters and model the rows share."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.harness.common import SYNC_ARCH, SYNC_JOB, SYNC_PRESET, BenchError, say

TRAIN_WAIT_S = 3600.0
"""How long a benchmark's training session may run before the row fails."""


class Bench:
    """Holds the in-memory client and the clusters the rows share."""

    def __init__(self, client: Any, args: argparse.Namespace, home: Path, service: Any = None) -> None:
        self.client = client
        self.service = service  # the server's ClusterService, for what no tool parameter asks
        self.args = args
        self.quick = bool(args.quick)
        self.home = home
        self.clusters: dict[int, str] = {}  # workers -> cluster id (mlp large, mesh)
        self.has_model: set[int] = set()
        self.checkpoint: str | None = None
        self.shared: dict[str, Any] = {}

    async def tool(self, name: str, args: dict[str, Any], client: Any = None) -> dict[str, Any]:
        result = await (client or self.client).call_tool(name, args)
        if result.is_error:
            text = result.content[0].text if result.content else "(no text)"
            raise BenchError(f"{name} failed: {text}")
        return result.structured_content or {}

    async def cluster(self, workers: int) -> str:
        if workers not in self.clusters:
            say(f"creating a {workers}-worker cluster ({SYNC_ARCH}/{SYNC_PRESET})")
            cid = (await self.tool("neural_cluster_init", {"name": f"bench-{workers}", "topology": "mesh",
                                                           "architecture": SYNC_ARCH}))["cluster_id"]
            await self.tool("neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": workers,
                                                   "model": SYNC_PRESET})
            await self.tool("neural_cluster_connect", {"cluster_id": cid})
            self.clusters[workers] = cid
        return self.clusters[workers]

    async def train_sync(self, cid: str, epochs: int, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A synchronous run, followed to its end; returns (train reply, training status)."""
        import anyio

        from flow_nexus_server.states import SessionState

        t0 = time.perf_counter()
        # Started, then polled: a wait=true call is one request, which the client gives up on after
        # 900 s, and on a loaded machine an epoch of the language model took longer than that.
        run = await self.tool("neural_train_distributed", {"cluster_id": cid, **SYNC_JOB, "epochs": epochs, **extra})
        while True:
            status = await self.tool("neural_training_status", {"session_id": run["session_id"]})
            if status["status"] != SessionState.RUNNING or time.perf_counter() - t0 > TRAIN_WAIT_S:
                break
            await anyio.sleep(0.5)
        wall = time.perf_counter() - t0
        await anyio.sleep(0.5)  # the session reads as ended just before its cluster is marked connected again
        if status["status"] != SessionState.COMPLETED:
            raise BenchError(f"session {run['session_id']} ended {status['status']}: {status.get('error')}")
        run["client_wall_s"] = wall
        for c in status.get("checkpoints") or []:
            if not c["deleted"]:
                self.checkpoint = c["checkpoint_id"]
        return run, status

    async def ensure_model(self, workers: int) -> str:
        """The cluster of ``workers`` nodes holds the benchmark model (trained or loaded)."""
        cid = await self.cluster(workers)
        if workers in self.has_model:
            return cid
        if self.checkpoint is None:
            two = await self.cluster(2)
            say("training the shared model (1 epoch) on the 2-worker cluster")
            await self.train_sync(two, 1)
            self.has_model.add(2)
            if self.checkpoint is None:
                raise BenchError("the training session left no checkpoint to load into the other clusters")
        if workers not in self.has_model:
            await self.tool("neural_model_load", {"cluster_id": cid, "path": self.checkpoint})
            self.has_model.add(workers)
        return cid

    @staticmethod
    def node_stats(status: dict[str, Any]) -> dict[str, dict[str, float]]:
        live = status.get("live") or {}
        nodes = live.get("nodes") or (status.get("final_metrics") or {}).get("nodes") or {}
        if not nodes:
            raise BenchError(f"session {status['session_id']} reported no per-node stats")
        return nodes
