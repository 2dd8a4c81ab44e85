"""Edge lists of the four topologies over ranks 0..n-1 (the Flow Nexus rules)."""

from __future__ import annotations

from workers.protocol import TOPOLOGIES  # noqa: F401 - re-exported


def edges(topology: str, n: int) -> list[tuple[int, int]]:
    """Directed edges (src, dst) between ranks.

    mesh: every pair; ring: i -> i+1 mod n; star: rank 0 is the hub;
    hierarchical: binary tree, the parent of i is (i - 1) // 2.
    """
    if topology == "mesh":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if topology == "ring":
        if n < 2:
            return []
        if n == 2:
            return [(0, 1)]  # i -> i+1 and back is the same link
        return [(i, (i + 1) % n) for i in range(n)]
    if topology == "star":
        return [(0, i) for i in range(1, n)]
    if topology == "hierarchical":
        return [((i - 1) // 2, i) for i in range(1, n)]
    raise ValueError(f"unknown topology {topology!r}; use one of {', '.join(TOPOLOGIES)}")
