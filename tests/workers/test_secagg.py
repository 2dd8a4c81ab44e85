"""Secure aggregation (workers.secagg) against the textbook properties: the masks cancel, the
aggregate equals FedAvg, a masked input says nothing about its update, dropouts are recovered."""

from __future__ import annotations

import numpy as np
import pytest

from workers import secagg
from workers.aggregation import aggregate


def test_shamir_any_t_shares_rebuild_and_fewer_do_not():
    secret = int.from_bytes(b"\x07" * 32, "big")
    shares = secagg.shamir_split(secret, 5, 3)
    assert secagg.shamir_join(shares[:3]) == secret
    assert secagg.shamir_join([shares[4], shares[1], shares[2]]) == secret
    assert secagg.shamir_join(shares[:2]) != secret  # below the threshold: some other field element


def test_fixed_point_round_trip_and_ring_sum():
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 3, 1000) for _ in range(4)]
    total = sum((secagg.quantize(x) for x in xs), start=np.zeros(1000, dtype=np.uint64))
    assert np.abs(secagg.dequantize(total) - sum(xs)).max() < 4 * 2.0 ** -secagg.FRAC_BITS
    with pytest.raises(secagg.SecAggError, match="NaN"):
        secagg.quantize(np.array([1.0, np.nan]))
    with pytest.raises(secagg.SecAggError, match="fixed-point range"):
        secagg.quantize(np.array([1e12]))


def test_key_agreement_is_symmetric_and_the_prg_is_seeded():
    a, b = secagg.X25519PrivateKey.generate(), secagg.X25519PrivateKey.generate()
    ab = secagg.agree(a, secagg.public_bytes(b), b"x")
    assert ab == secagg.agree(b, secagg.public_bytes(a), b"x") and ab != secagg.agree(a, secagg.public_bytes(b), b"y")
    assert np.array_equal(secagg.prg(ab, 50), secagg.prg(ab, 50))
    assert not np.array_equal(secagg.prg(ab, 50), secagg.prg(bytes(32), 50))


def _updates(n: int, d: int, seed: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, d) for _ in range(n)], rng.integers(50, 500, n).astype(np.float64)


def test_secure_sum_equals_fedavg_and_masked_inputs_are_unrelated_to_updates():
    updates, counts = _updates(5, 4000)
    vectors = [secagg.quantize(np.append(c * u, c)) for u, c in zip(updates, counts)]
    total, masked = secagg.run_local(vectors)
    s = secagg.dequantize(total)
    fedavg, _ = aggregate("fedavg", np.stack(updates), weights=counts)
    assert np.abs(s[:-1] / s[-1] - fedavg).max() < 1e-5
    # What the aggregator received from each worker is uniform noise in the ring: no linear
    # relation to that worker's update (|r| ~ 1/sqrt(d) = 0.016 by chance).
    for i, y in masked.items():
        received = secagg.dequantize(y[:-1])
        assert abs(np.corrcoef(received, updates[i])[0, 1]) < 0.06
        assert np.abs(received).mean() > 1e6  # spread over the whole ring, not near the update's scale


def test_a_worker_dropping_out_mid_round_is_recovered():
    updates, counts = _updates(5, 300, seed=2)
    vectors = [secagg.quantize(np.append(c * u, c)) for u, c in zip(updates, counts)]
    total, masked = secagg.run_local(vectors, drop_after_sharing=frozenset({3}))
    assert sorted(masked) == [0, 1, 2, 4]
    s = secagg.dequantize(total)
    alive = [0, 1, 2, 4]
    expected = sum(counts[i] * updates[i] for i in alive) / counts[alive].sum()
    assert np.abs(s[:-1] / s[-1] - expected).max() < 1e-5
    # Too many dropouts: the survivors cannot reach the threshold, and the sum stays hidden.
    with pytest.raises(secagg.SecAggError, match="needs 3"):
        secagg.run_local(vectors, drop_after_sharing=frozenset({0, 1, 2}))


def test_a_client_answers_the_unmasking_round_once():
    clients = [secagg.Client(i, 3, 2) for i in range(3)]
    server = secagg.Server(3, 2, [c.advertise() for c in clients])
    routed = server.route({c.index: c.share_keys(server.keys) for c in clients})
    for c in clients:
        c.masked_input(np.zeros(4, dtype=np.uint64), routed[c.index])
    clients[0].unmask([0, 1, 2])
    # A second request with another survivor list could reveal both secrets of client 2.
    with pytest.raises(secagg.SecAggError, match="already answered"):
        clients[0].unmask([0, 1])
