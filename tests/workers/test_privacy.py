"""Differential privacy (workers.privacy): the accountant is opacus' own, central DP clips and
noises as stated, and what cannot combine is refused with a sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from torch import nn

from workers import privacy
from workers.protocol import DifferentialPrivacy, TrainJob


def _reference(noise: float, q: float, steps: int, delta: float) -> float:
    """opacus' analysis functions, called directly (the computation its RDPAccountant wraps)."""
    alphas = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=alphas, rdp=compute_rdp(q=q, noise_multiplier=noise, steps=steps, orders=alphas),
                               delta=delta)
    return float(eps)


@pytest.mark.parametrize(("noise", "q", "steps"), [(1.1, 32 / 1400, 440), (0.8, 1.0, 20), (4.0, 1.0, 5)])
def test_epsilon_matches_opacus_reference(noise, q, steps):
    assert privacy.epsilon(noise, q, steps, 1e-5) == pytest.approx(_reference(noise, q, steps, 1e-5), rel=1e-9)


def test_an_accountant_stepped_by_dp_sgd_agrees_with_the_round_cost():
    """The live path: an opacus DPOptimizer's step hook steps the accountant once per step."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    dp = DifferentialPrivacy(mode="local", noise_multiplier=1.0, max_grad_norm=1.0)
    cost = privacy.local_cost(dp, shard=320, batch_size=32, local_epochs=1)
    model = GradSampleModule(nn.Linear(4, 2))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=32)
    acc = RDPAccountant()
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=cost.sample_rate))
    for _ in range(2 * cost.steps):  # two rounds
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 4)), torch.randint(0, 2, (32,))).backward()
        opt.step()
    assert acc.get_epsilon(delta=cost.delta) == pytest.approx(cost.after(2), rel=1e-9)


def test_affordable_rounds_stop_at_the_budget():
    dp = DifferentialPrivacy(mode="central", noise_multiplier=2.0, max_grad_norm=1.0, target_epsilon=3.0)
    cost = privacy.central_cost(dp, 4)
    k = cost.affordable_rounds(3.0, 1000)
    assert 0 < k < 1000 and cost.after(k) <= 3.0 < cost.after(k + 1)
    assert cost.delta == 1e-5  # min(1e-5, 1/4)
    assert privacy.budget_refusal(cost, 0.1, "central DP") is not None  # one round already spends more


def test_central_aggregate_clips_each_update_and_adds_calibrated_noise():
    dp = DifferentialPrivacy(mode="central", noise_multiplier=0.5, max_grad_norm=1.0)
    updates = np.array([[30.0, 40.0], [0.3, 0.4]])  # norms 50 and 0.5
    clipped = privacy.clip_update(updates[0], 1.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0) and np.allclose(privacy.clip_update(updates[1], 1.0),
                                                                          updates[1])
    draws = np.stack([privacy.central_aggregate(updates, dp, np.random.default_rng(i)) for i in range(4000)])
    expected_mean = (clipped + updates[1]) / 2
    assert np.allclose(draws.mean(axis=0), expected_mean, atol=0.02)
    assert np.allclose(draws.std(axis=0), 0.5 * 1.0 / 2, rtol=0.05)  # std z*C on the sum, / n workers


def _job(**kw) -> TrainJob:
    base = {"dataset": "digits", "session_id": "s", "mode": "federated", "topology": "star", "architecture": "mlp",
            "roles": ["aggregator", "worker", "worker", "worker"]}
    return TrainJob(**(base | kw))


LOCAL = {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
CENTRAL = {"mode": "central", "noise_multiplier": 1.0, "max_grad_norm": 1.0}


@pytest.mark.parametrize(("kw", "words"), [
    ({"mode": "sync", "differential_privacy": LOCAL}, "federated mode only"),
    ({"mode": "sync", "secure_aggregation": True}, "federated mode only"),
    ({"secure_aggregation": True, "aggregation_rule": "krum"}, "aggregation_rule 'krum' needs each worker's own"),
    ({"secure_aggregation": True, "aggregation_rule": "median"}, "'median'"),
    ({"secure_aggregation": True, "aggregation_rule": "trimmed_mean"}, "'trimmed_mean'"),
    ({"secure_aggregation": True, "consensus": "byzantine"}, "consensus 'byzantine'"),
    ({"secure_aggregation": True, "reputation_weighting": True}, "reputation_weighting"),
    ({"differential_privacy": CENTRAL, "aggregation_rule": "multi_krum"}, "central differential privacy"),
    ({"differential_privacy": LOCAL, "consensus": "gossip"}, "gossip"),
    ({"differential_privacy": LOCAL, "gradient_accumulation": 4}, "gradient_accumulation cannot combine"),
    ({"differential_privacy": CENTRAL | {"target_epsilon": 0.05}}, "above target_epsilon 0.05"),
])
def test_incompatible_combinations_are_refused(kw, words):
    refusal = privacy.session_refusal(_job(**kw), 3)
    assert refusal is not None and words in refusal


def test_compatible_combinations_pass():
    assert privacy.session_refusal(_job(differential_privacy=LOCAL, secure_aggregation=True), 3) is None
    assert privacy.session_refusal(_job(differential_privacy=CENTRAL, secure_aggregation=True, consensus="raft"),
                                   3) is None
    assert "at least 2 workers" in privacy.session_refusal(_job(secure_aggregation=True), 1)


def test_layers_opacus_cannot_train_are_named():
    assert privacy.unsupported_layers(nn.Sequential(nn.Linear(3, 3), nn.ReLU())) == []
    problems = privacy.unsupported_layers(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    assert problems and "BatchNorm" in problems[0]


@pytest.mark.parametrize(("architecture", "layer"), [("rnn", "nn.LSTM"), ("transformer", "nn.MultiheadAttention")])
def test_local_dp_refuses_models_with_layers_opacus_cannot_train(architecture, layer):
    job = _job(architecture=architecture, differential_privacy=LOCAL)
    refusal = privacy.layer_refusal(job, "text", [], 2)
    assert refusal is not None and layer in refusal and "mode 'central'" in refusal
    assert privacy.layer_refusal(_job(architecture="mlp", differential_privacy=LOCAL), "text", [], 2) is None
    assert privacy.layer_refusal(_job(architecture="cnn", differential_privacy=LOCAL), "images", [1, 8, 8], 10) is None
    assert privacy.layer_refusal(_job(architecture=architecture, differential_privacy=CENTRAL), "text", [], 2) is None


def test_local_dp_refuses_a_target_one_round_exceeds():
    job = _job(differential_privacy=LOCAL | {"target_epsilon": 1.0}, batch_size=32)
    refusal = privacy.local_budget_refusal(job, 719, 719)
    assert refusal is not None and "above target_epsilon 1" in refusal and "719 records" in refusal
    assert privacy.local_budget_refusal(_job(differential_privacy=LOCAL | {"target_epsilon": 3.0}), 719, 719) is None
