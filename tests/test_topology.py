from flow_nexus_server.service.topology import edges


def test_mesh_is_every_pair():
    assert edges("mesh", 4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_ring_closes_the_loop():
    assert edges("ring", 4) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert edges("ring", 2) == [(0, 1)]
    assert edges("ring", 1) == []


def test_star_hub_is_first_node():
    assert edges("star", 4) == [(0, 1), (0, 2), (0, 3)]


def test_hierarchical_is_a_binary_tree():
    assert edges("hierarchical", 6) == [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]
