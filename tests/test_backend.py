"""Backend choice and GPU pinning rules (pure functions), and the docker/GPU deploy spec."""

from __future__ import annotations

import pytest

from flow_nexus_server.service.backend import (check_gpus, check_requested, choose_backend, gpus_visible_here,
                                               local_ranks)
from flow_nexus_server.service.errors import ServiceError


def test_auto_is_nccl_only_when_every_node_sees_a_gpu():
    assert choose_backend("auto", {"node_a": 1, "node_b": 8})[0] == "nccl"
    backend, why = choose_backend("auto", {"node_a": 1, "node_b": 0})
    assert backend == "gloo" and why == "1 of 2 node(s) see no CUDA device"
    assert choose_backend("auto", {})[0] == "gloo"
    assert choose_backend("gloo", {"node_a": 4})[0] == "gloo"


def test_nccl_without_gpus_names_the_nodes_that_see_none():
    assert choose_backend("nccl", {"node_a": 2, "node_b": 1})[0] == "nccl"
    with pytest.raises(ServiceError) as info:
        choose_backend("nccl", {"node_a": 2, "node_b": 0, "node_c": 0})
    msg = str(info.value)
    assert "node_b, node_c see none" in msg and "node_a" not in msg and "'auto'" in msg


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
