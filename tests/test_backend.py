"""Backend choice and GPU pinning rules (pure functions), and the docker/GPU deploy spec."""

from __future__ import annotations

import pytest

from flow_nexus_server.service.backend import (
    NodeGpus,
    check_gpus,
    check_requested,
    choose_backend,
    gpus_visible_here,
    local_ranks,
    pinned_gpu,
)
from flow_nexus_server.service.errors import ServiceError


def gpus(*counts: int, host: str = "10.0.0.1") -> list[NodeGpus]:
    """Nodes node_a, node_b, ... on ``host`` that see ``counts`` GPUs (nothing hidden)."""
    return [NodeGpus(f"node_{chr(97 + i)}", host, n) for i, n in enumerate(counts)]


def test_auto_is_nccl_only_when_every_node_has_a_gpu_of_its_own():
    assert choose_backend("auto", gpus(8, 8)) == ("nccl", "every node has a GPU of its own")
    assert choose_backend("auto", gpus(1, 0)) == ("gloo", "1 of 2 node(s) see no CUDA device")
    assert choose_backend("auto", [])[0] == "gloo"
    assert choose_backend("gloo", gpus(4))[0] == "gloo"
    # Two nodes on a one-GPU machine would both pin cuda:0.
    backend, why = choose_backend("auto", gpus(1, 1))
    assert backend == "gloo" and why.startswith("node_a and node_b would both pin GPU 0 of 10.0.0.1")
    # ... unlike one GPU each on two machines, or one GPU each that Ray set aside per actor.
    assert choose_backend("auto", gpus(1, host="h1") + [NodeGpus("node_z", "h2", 1)])[0] == "nccl"
    isolated = [NodeGpus("node_a", "h", 1, "0"), NodeGpus("node_b", "h", 1, "1")]
    assert choose_backend("auto", isolated)[0] == "nccl"
    # Three nodes over two shared GPUs: the third wraps round onto the first one's.
    assert choose_backend("auto", gpus(2, 2, 2))[1].startswith("node_a and node_c would both pin GPU 0")


def test_nccl_without_a_gpu_per_node_names_the_nodes():
    assert choose_backend("nccl", gpus(2, 2))[0] == "nccl"
    with pytest.raises(ServiceError) as info:
        choose_backend("nccl", gpus(2, 0, 0))
    msg = str(info.value)
    assert "node_b, node_c see none" in msg and "node_a" not in msg and "'auto'" in msg
    with pytest.raises(ServiceError, match="node_a and node_b would both pin GPU 3 of h") as info:
        choose_backend("nccl", [NodeGpus("node_a", "h", 1, "3"), NodeGpus("node_b", "h", 1, "3")])
    assert "num_gpus 1" in str(info.value)


def test_pinned_gpu_names_the_visible_device():
    assert pinned_gpu(1, 4, None) == "1" and pinned_gpu(5, 4, None) == "1"
    assert pinned_gpu(0, 2, "2,3") == "2" and pinned_gpu(1, 2, "GPU-aa, GPU-bb") == "GPU-bb"
    assert pinned_gpu(0, 1, "") == "0"


def test_local_rank_counts_ranks_on_the_same_host_in_rank_order():
    assert local_ranks(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]) == [0, 1, 0, 2, 1]
    assert local_ranks(["127.0.0.1"] * 3) == [0, 1, 2]


def test_hidden_gpus_are_not_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpus_visible_here()
    with pytest.raises(ServiceError, match="backend 'nccl' needs a CUDA device"):
        check_requested("nccl", "subprocess")
    with pytest.raises(ServiceError, match="num_gpus 0.5 asked for"):
        check_gpus(0.5, "subprocess")
    # Nodes elsewhere (ray, docker) are asked at connect; local CPU nodes are fine.
    check_requested("nccl", "ray")
    check_gpus(1, "ray")
    check_requested("auto", "subprocess")
    check_gpus(0, "subprocess")
