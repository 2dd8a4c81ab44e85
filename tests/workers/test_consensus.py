"""Consensus modes under attack: robust aggregation, gossip, proof-of-learning, raft, reputation.

One launch of 5 node processes (the multi-process harness of ``test_training.py``) runs every
job below back to back on sklearn digits. Most jobs use 4 workers + an aggregator (the
acceptance setting of the issue); worker rank 1 simulates a Byzantine node where a job says
so (``behaviors``: the adversary simulation of ``workers.training.adversary``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

try:
    import workers.training  # noqa: F401
except ImportError:  # run from elsewhere than the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import launch  # noqa: E402  (the shared multi-process harness)

from workers.protocol import (
    Behavior,  # noqa: E402
    TrainJob,  # noqa: E402
)
from workers.training import load_checkpoint  # noqa: E402
from workers.training.adversary import corrupt_gradient, corrupt_weights  # noqa: E402
from workers.training.consensus import (  # noqa: E402
    RaftReplica,
    Reputation,
    gossip_neighbours,
    majority,
    mixing_weights,
    pol_accepts,
    resolve_rule,
)

WORLD = 5
AGG4 = ["aggregator", "worker", "worker", "worker", "worker"]  # 4 workers + aggregator
VAL3 = ["aggregator", "validator", "worker", "worker", "worker"]  # PoL judged by a validator
RAFT = ["aggregator", "worker", "worker", "worker", "validator"]
HONEST = {"kind": "honest"}
NOISY = [HONEST, {"kind": "gaussian_noise", "scale": 50.0}, HONEST, HONEST, HONEST]  # w + 50 N(0, 1)
FLIP = [HONEST, HONEST, {"kind": "sign_flip", "scale": 10.0}, HONEST, HONEST]  # g - 10 (w - g)
ROUNDS = 5


def _fed(session: str, roles: list[str] = AGG4, **kw: Any) -> dict[str, Any]:
    job = dict(session_id=session, mode="federated", topology="mesh", dataset="digits", architecture="mlp",
               rounds=ROUNDS, local_epochs=1, batch_size=8, learning_rate=0.01, seed=0, roles=roles)
    job.update(kw)
    return job


def _jobs() -> list[dict[str, Any]]:
    return [
        {"name": "krum", "job": _fed("krum", consensus="byzantine", aggregation_rule="krum", byzantine_f=1,
                                     behaviors=NOISY)},
        {"name": "median", "job": _fed("median", consensus="byzantine", aggregation_rule="median", behaviors=NOISY)},
        {"name": "trimmed", "job": _fed("trim", consensus="byzantine", aggregation_rule="trimmed_mean",
                                        trim_beta=0.25, behaviors=NOISY)},
        # plain FedAvg: proof-of-learning that never rejects a finite candidate
        {"name": "fedavg", "job": _fed("avg", consensus="proof-of-learning", pol_tolerance=1e9, behaviors=NOISY)},
        {"name": "multi-krum-rep", "job": _fed("mkr", consensus="byzantine", aggregation_rule="multi_krum",
                                               reputation_weighting=True, behaviors=NOISY)},
        {"name": "gossip", "job": _fed("gossip", consensus="gossip", topology="ring")},
        {"name": "pol-noisy", "job": _fed("poln", behaviors=NOISY)},  # the default consensus, one noisy of four
        {"name": "pol-flip", "job": _fed("polf", VAL3, behaviors=FLIP)},
        {"name": "pol-honest", "job": _fed("polh", VAL3)},
        {"name": "raft", "job": _fed("raft", RAFT, consensus="raft", rounds=3)},
        {"name": "raft-resume", "job": _fed("raft2", RAFT, consensus="raft", rounds=5,
                                            resume_from="raft/committed.safetensors")},
        {"name": "sync-byz", "job": _fed("sbyz", mode="sync", epochs=3, consensus="byzantine",
                                         aggregation_rule="median", behaviors=NOISY)},
    ]


W3 = ["aggregator", "worker", "worker"]


def _jobs3() -> list[dict[str, Any]]:
    """A second, smaller launch: paths that need their own sandboxes or roles."""
    return [
        # nodes 1 and 2 cannot store a version (their raft/ is a file): 1 ack of 3, no commit
        {"name": "raft-noquorum", "job": _fed("rnq", W3, consensus="raft", rounds=2)},
        # every update NaN: proof-of-learning leaves out both, no candidate: every round rejected, the job completes
        {"name": "pol-nan", "job": _fed("pnan", W3, rounds=2, behaviors=[HONEST, {"kind": "nan"}, {"kind": "nan"}])},
        # sync byzantine with the first worker as hub; fedavg left as is -> the median (n < 2f + 3)
        {"name": "sync-byz-w", "job": _fed("sbw", ["worker"] * 3, mode="sync", epochs=2, consensus="byzantine",
                                           behaviors=[HONEST, HONEST, {"kind": "gaussian_noise", "scale": 50.0}])},
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("consensus")
    jobs = _jobs()
    t0 = time.perf_counter()
    ranks = launch(WORLD, jobs, root)
    seconds = time.perf_counter() - t0
    res = {j["name"]: [ranks[r][i] if i < len(ranks[r]) else None for r in range(WORLD)]
           for i, j in enumerate(jobs)}
    out = {"root": root, "seconds": seconds, "res": res}
    _report(out)
    return out


@pytest.fixture(scope="module")
def run3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("consensus3")
    for r in (1, 2):
        (root / f"node{r}").mkdir(parents=True)
        (root / f"node{r}" / "raft").write_text("not a directory: this node cannot store raft versions\n")
    jobs = _jobs3()
    t0 = time.perf_counter()
    ranks = launch(3, jobs, root)
    out = {"root": root, "seconds": time.perf_counter() - t0,
           "res": {j["name"]: [ranks[r][i] if i < len(ranks[r]) else None for r in range(3)]
                   for i, j in enumerate(jobs)}}
    _report(out)
    return out


def _ok(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    res = run["res"][name]
    for r, x in enumerate(res):
        assert x is not None, f"{name}: rank {r} never ran it"
        assert x["error"] is None, f"{name}: rank {r} failed: {x['error']}"
    return res


def _rep(res: list[dict[str, Any]]) -> dict[str, Any]:
    reps = [x["snapshot"] for x in res if x["snapshot"]["reporter"]]
    assert len(reps) == 1
    return reps[0]


def _series(snap: dict[str, Any], name: str) -> list[tuple[int, float]]:
    return [(s["epoch"], s["value"]) for s in snap["samples"] if s["name"] == name]


def _report(run: dict[str, Any]) -> None:
    """Measured figures, printed for the record (pytest -s shows them)."""
    world = len(next(iter(run["res"].values())))
    lines = [f"consensus launch: {run['seconds']:.1f} s for {len(run['res'])} jobs on {world} processes"]
    for name, res in run["res"].items():
        if any(x is None or x["error"] for x in res):
            lines.append(f"  {name}: FAILED {[x and x['error'] for x in res]}")
            continue
        snap = _rep(res)
        acc = snap["latest"].get("val_accuracy", float("nan"))
        secs = max(x["seconds"] for x in res)
        stats = {**snap["node_stats"], **res[0]["snapshot"]["node_stats"]}  # reporter + aggregator / hub
        extra = {k: round(v, 3) for k, v in stats.items()
                 if k.startswith("reputation") or k in ("rejected_rounds", "rejected_updates", "excluded_updates",
                                                         "raft_commit_index", "raft_term")}
        spread = [round(v, 3) for _, v in _series(snap, "model_spread")]
        lines.append(f"  {name}: val_accuracy {acc:.4f} in {secs:.1f} s; {extra}" + (f"; spread {spread}" if spread
                                                                                         else ""))
    print("\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- (a) robust rules


@pytest.mark.parametrize("name", ["krum", "median", "trimmed", "multi-krum-rep"])
def test_robust_rules_hold_under_gaussian_attack(run: dict[str, Any], name: str) -> None:
    res = _ok(run, name)
    agg = res[0]["snapshot"]
    assert agg["reporter"]
    assert agg["latest"]["val_accuracy"] >= 0.90, (name, agg["latest"])
    assert agg["node_stats"]["rounds"] == ROUNDS
    assert any("ADVERSARY SIMULATION" in line for line in res[1]["snapshot"]["log_lines"])
    # everyone holding a model holds the global one
    for r in range(2, WORLD):
        assert torch.equal(res[0]["weights"], res[r]["weights"])


def test_plain_fedavg_is_visibly_worse(run: dict[str, Any]) -> None:
    avg = _rep(_ok(run, "fedavg"))
    assert avg["node_stats"]["rejected_rounds"] == 0  # nothing rolled back: this really was plain FedAvg
    plain = avg["latest"]["val_accuracy"]
    for name in ("krum", "median", "trimmed"):
        robust = _rep(_ok(run, name))["latest"]["val_accuracy"]
        assert robust >= plain + 0.1, (name, robust, plain)


def test_krum_rejects_the_noisy_worker(run: dict[str, Any]) -> None:
    agg = _rep(_ok(run, "krum"))
    lines = [line for line in agg["log_lines"] if line.startswith("round ") and "krum" in line]
    assert len(lines) == ROUNDS
    for line in lines:
        assert "selected workers [1]" not in line and "rejected [" in line
    assert agg["node_stats"]["rejected_updates"] == 3 * ROUNDS  # krum keeps 1 of 4 each round


# ----------------------------------------------------------------------------- (e) reputation


@pytest.mark.parametrize("name", ["krum", "median", "trimmed", "multi-krum-rep", "sync-byz"])
def test_reputation_of_the_noisy_worker_drops(run: dict[str, Any], name: str) -> None:
    res = _ok(run, name)
    hub = res[0]["snapshot"]["node_stats"]
    rep = {r: hub[f"reputation_rank{r}"] for r in range(1, WORLD)}
    honest = [rep[r] for r in range(2, WORLD)]
    assert rep[1] <= 0.7, rep  # 0.9 ** 5 = 0.59 when flagged in each of the 5 rounds
    assert min(honest) >= 0.9, rep
    assert min(honest) - rep[1] >= 0.25, rep


# ----------------------------------------------------------------------------- sync, byzantine


def test_sync_byzantine_median_of_gradients(run: dict[str, Any]) -> None:
    res = _ok(run, "sync-byz")
    rep = res[1]["snapshot"]  # reporter: the first worker; the aggregator is the hub
    assert rep["reporter"]
    assert rep["latest"]["val_accuracy"] >= 0.90, rep["latest"]
    assert [e for e, _ in _series(rep, "val_accuracy")] == [1, 2, 3]
    for r in range(WORLD):  # the hub and every worker step with the same robust gradient
        assert torch.equal(res[0]["weights"], res[r]["weights"])


# ----------------------------------------------------------------------------- (b) gossip


def test_gossip_ring_converges_and_spread_shrinks(run: dict[str, Any]) -> None:
    res = _ok(run, "gossip")
    assert res[0]["weights"] is None and res[0]["snapshot"]["state"] == "completed"  # the aggregator waits
    rep = res[1]["snapshot"]
    assert rep["reporter"]
    assert rep["latest"]["val_accuracy"] >= 0.90, rep["latest"]
    spread = _series(rep, "model_spread")
    assert [e for e, _ in spread] == list(range(1, ROUNDS + 1))
    assert spread[-1][1] < spread[0][1], spread
    assert all(v > 0 for _, v in spread)
    # the workers' models differ (no aggregator made them equal) but are close
    w = torch.stack([res[r]["weights"] for r in range(1, WORLD)])
    assert not torch.equal(w[0], w[1])
    mean = w.mean(0)
    measured = float(torch.linalg.vector_norm(w - mean, dim=1).mean())
    assert measured < spread[0][1]
    assert any("gossip neighbours of rank 1: [2, 4]" in line for line in rep["log_lines"])


# ----------------------------------------------------------------------------- (c) proof of learning


def test_proof_of_learning_leaves_out_a_sign_flipped_update(run: dict[str, Any]) -> None:
    """Each update is judged on its own: the flipped one is left out, the honest ones are committed."""
    res = _ok(run, "pol-flip")
    agg = res[0]["snapshot"]
    stats = agg["node_stats"]
    left_out = [line for line in agg["log_lines"] if "left out the update of worker rank(s) 2 (" in line]
    assert len(left_out) == ROUNDS and stats["excluded_updates"] >= ROUNDS  # rank 2 flips; 3 and 4 are honest
    assert stats["reputation_rank2"] < min(stats["reputation_rank3"], stats["reputation_rank4"])
    assert stats["rejected_rounds"] <= 1 and agg["latest"]["val_accuracy"] >= 0.90, agg["latest"]
    assert _series(agg, "excluded_updates")[-1][1] == stats["excluded_updates"]
    assert "candidate_val_loss" in res[1]["snapshot"]["node_stats"]  # the validator judged
    assert res[1]["weights"] is None  # a validator holds no model of its own


def test_proof_of_learning_holds_against_a_noisy_worker(run: dict[str, Any]) -> None:
    """The row plain FedAvg fails (``fedavg`` above): per-update proof-of-learning leaves the noise out."""
    agg = _ok(run, "pol-noisy")[0]["snapshot"]
    assert agg["latest"]["val_accuracy"] >= 0.90, agg["latest"]
    assert agg["node_stats"]["excluded_updates"] >= ROUNDS and agg["node_stats"]["rejected_rounds"] == 0
    assert agg["node_stats"]["reputation_rank1"] < 0.7  # rank 1 is the noisy worker


def test_proof_of_learning_commits_honest_rounds(run: dict[str, Any]) -> None:
    res = _ok(run, "pol-honest")
    agg = res[0]["snapshot"]
    assert agg["node_stats"]["rejected_rounds"] <= 1
    assert agg["latest"]["val_accuracy"] >= 0.90, agg["latest"]
    assert [e for e, _ in _series(agg, "rejected_rounds")] == list(range(1, ROUNDS + 1))


# ----------------------------------------------------------------------------- (d) raft


def test_raft_commits_every_round_and_resumes(run: dict[str, Any]) -> None:
    res = _ok(run, "raft")
    leader = res[0]["snapshot"]["node_stats"]
    assert leader["raft_term"] == 1 and leader["raft_commit_index"] == 3
    for r in range(WORLD):  # leader, workers and the validator all hold the replica
        assert (run["root"] / f"node{r}" / "raft" / "committed.safetensors").exists()
        assert not (run["root"] / f"node{r}" / "raft" / "pending.safetensors").exists()
    # the committed file on a worker is a checkpoint: load it and compare with the final model
    raft_file = run["root"] / "node1" / "raft" / "committed.safetensors"
    loaded = load_checkpoint(raft_file)
    # (the resume job overwrote it with version 5; its weights are that job's final model)
    flat = torch.cat([p.detach().reshape(-1) for p in loaded.model.parameters()])
    res2 = _ok(run, "raft-resume")
    assert loaded.epoch == 5
    assert torch.equal(flat, res2[1]["weights"])
    leader2 = res2[0]["snapshot"]
    assert leader2["node_stats"]["raft_commit_index"] == 5
    assert [e for e, _ in _series(leader2, "val_accuracy")] == [4, 5]
    assert any("resumed from raft/committed.safetensors" in line for line in leader2["log_lines"])
    assert leader2["latest"]["val_accuracy"] >= res[0]["snapshot"]["latest"]["val_accuracy"] - 0.02


# ----------------------------------------------------------------------------- the small launch


def test_raft_without_quorum_commits_nothing(run3: dict[str, Any]) -> None:
    res = _ok(run3, "raft-noquorum")
    leader = res[0]["snapshot"]
    assert leader["node_stats"]["raft_commit_index"] == 0
    assert [v for _, v in _series(leader, "raft_commit_index")] == [0.0, 0.0]
    assert sum("not committed (1 of 3 acknowledged)" in line for line in leader["log_lines"]) == 2
    assert not (run3["root"] / "node0" / "raft" / "committed.safetensors").exists()
    assert not (run3["root"] / "node0" / "raft" / "pending.safetensors").exists()
    assert leader["latest"]["val_accuracy"] < 0.3  # still the initial model
    assert torch.equal(res[0]["weights"], res[1]["weights"]) and torch.equal(res[0]["weights"], res[2]["weights"])


def test_proof_of_learning_rejects_rounds_without_a_candidate(run3: dict[str, Any]) -> None:
    res = _ok(run3, "pol-nan")
    agg = res[0]["snapshot"]
    assert agg["state"] == "completed" and agg["node_stats"]["rejected_rounds"] == 2
    assert sum("no candidate model" in line for line in agg["log_lines"]) == 2
    assert sum("rejected: val loss" in line and "no candidate" in line for line in agg["log_lines"]) == 2
    assert bool(torch.isfinite(res[0]["weights"]).all())
    stats = agg["node_stats"]
    assert stats["reputation_rank2"] < 0.9 and stats["reputation_rank1"] < 0.9  # the NaN senders are penalised
    assert stats["rejected_updates"] == stats["excluded_updates"] == 4


def test_sync_byzantine_hub_is_the_first_worker(run3: dict[str, Any]) -> None:
    res = _ok(run3, "sync-byz-w")
    hub = res[0]["snapshot"]
    assert hub["reporter"] and hub["latest"]["val_accuracy"] >= 0.85, hub["latest"]
    assert any("using the coordinate median" in line for line in hub["log_lines"])
    stats = hub["node_stats"]
    assert stats["reputation_rank2"] < 0.1 < 0.9 < min(stats["reputation_rank0"], stats["reputation_rank1"])
    assert torch.equal(res[0]["weights"], res[2]["weights"])


# ----------------------------------------------------------------------------- in-process


def test_rule_resolution() -> None:
    def job(**kw: Any) -> TrainJob:
        return TrainJob(session_id="x", mode="federated", topology="mesh", dataset="digits", architecture="mlp",
                        roles=["worker"], **kw)

    assert resolve_rule(job(consensus="byzantine"), 5)[0] == "krum"
    assert resolve_rule(job(consensus="byzantine"), 4)[0] == "median"
    assert resolve_rule(job(consensus="byzantine", aggregation_rule="trimmed_mean"), 4) == ("trimmed_mean", None)
    assert resolve_rule(job(), 4) == ("fedavg", None)


def test_gossip_graphs_and_weights() -> None:
    assert gossip_neighbours("ring", 4) == [[1, 3], [0, 2], [1, 3], [0, 2]]
    assert gossip_neighbours("ring", 2) == [[1], [0]]
    assert gossip_neighbours("mesh", 3) == [[1, 2], [0, 2], [0, 1]]
    assert gossip_neighbours("hierarchical", 5) == [[1, 2], [0, 3, 4], [0], [1], [1]]
    assert gossip_neighbours("star", 4) == [[1, 2, 3], [0], [0], [0]]
    for topo in ("ring", "mesh", "hierarchical", "star"):
        w = mixing_weights(gossip_neighbours(topo, 5))
        m = np.array([[row.get(j, 0.0) for j in range(5)] for row in w])
        assert np.allclose(m, m.T) and np.allclose(m.sum(0), 1) and (m >= 0).all()
        x = np.random.default_rng(0).normal(size=(5, 3))
        for _ in range(200):
            x = m @ x
        assert np.allclose(x, x.mean(0), atol=1e-6)  # consensus on the mean


def test_pol_and_majority() -> None:
    assert pol_accepts(1.0, 1.04, 0.05) and not pol_accepts(1.0, 1.06, 0.05)
    assert not pol_accepts(1.0, math.nan, 0.05) and not pol_accepts(1.0, math.inf, 100)
    assert majority([1, 1, 0], 3) and not majority([1, 0, 0, 1], 4) and majority([1, 1, 1, 0, 0], 5)


def test_adversary_corruptions() -> None:
    g, w = torch.zeros(4), torch.ones(4)
    assert torch.equal(corrupt_weights(w, g, Behavior(kind="sign_flip", scale=2), seed=0, rank=1, when=1),
                       -2 * torch.ones(4))
    assert torch.equal(corrupt_weights(w, g, Behavior(kind="scaled", scale=3), seed=0, rank=1, when=1),
                       3 * torch.ones(4))
    assert torch.isnan(corrupt_weights(w, g, Behavior(kind="nan"), seed=0, rank=1, when=1)).all()
    noisy = corrupt_weights(w, g, Behavior(kind="gaussian_noise", scale=50), seed=0, rank=1, when=1)
    assert float((noisy - w).std()) > 10
    assert torch.equal(corrupt_weights(w, g, Behavior(), seed=0, rank=1, when=1), w)
    assert torch.equal(corrupt_gradient(w, Behavior(kind="sign_flip"), seed=0, rank=1, when=1), -w)


def test_raft_replica(tmp_path: Path) -> None:
    written: list[int] = []

    def write(path: Path, version: int) -> None:
        path.write_text(str(version))
        written.append(version)

    rep = RaftReplica(tmp_path, write)
    assert rep.store(1, torch.ones(3)) and rep.commit(1, torch.ones(3))
    assert rep.committed_path.read_text() == "1" and rep.version == 1
    assert rep.store(2, torch.ones(3)) and (tmp_path / "raft" / "pending.safetensors").exists()
    rep.discard()
    assert not (tmp_path / "raft" / "pending.safetensors").exists() and rep.committed_path.read_text() == "1"
    assert not rep.store(3, torch.full((3,), float("nan")))  # never acknowledges a non-finite version
    blocked = RaftReplica(tmp_path / "f", write)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "raft").write_text("x")
    assert not blocked.store(1, torch.ones(3))
    assert not blocked.commit(1, torch.ones(3)) and blocked.version == 1  # follows the group in memory


def test_reputation_tracker() -> None:
    rep = Reputation([1, 2, 3, 4])
    info = {"distances_to_aggregate": [100.0, 1.0, 1.2, 0.9], "rejected": [0], "nonfinite": []}
    for _ in range(5):
        assert rep.observe(info, "median") == [1]
    assert rep.values[1] < 0.6 and min(rep.values[r] for r in (2, 3, 4)) == 1.0
    w = rep.weights(np.array([10.0, 10.0, 10.0, 10.0]))
    assert w[0] < w[1] == 10.0
    assert rep.rejected_updates == 5
