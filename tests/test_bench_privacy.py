"""The privacy rows' set-up without running them: the noise they ask for spends the benchmark's
epsilon by the server's own accountant (so no run is cut short by its target_epsilon), and the
Flower DP line is skipped, naming what to install, when no Flower interpreter is given."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.harness.privacy import TARGET_EPSILON, _flower_dp_row, central_noise_for, noise_for
from benchmarks.harness.session import Bench
from workers.privacy import central_cost, local_cost
from workers.protocol import DifferentialPrivacy


@pytest.mark.slow
@pytest.mark.privacyslow  # opacus' import and calibration: seconds idle, minutes on a loaded machine
@pytest.mark.parametrize("rounds", [2, 5])
def test_calibrated_noise_spends_the_target_by_the_servers_accountant(rounds: int) -> None:
    central = DifferentialPrivacy(mode="central", noise_multiplier=central_noise_for(TARGET_EPSILON, rounds),
                                  max_grad_norm=1.0)
    spent = central_cost(central, 4).after(rounds)
    assert TARGET_EPSILON - 0.05 < spent <= TARGET_EPSILON
    shard = 359  # digits, 0.2 held out, the smallest of 4 IID shards
    local = DifferentialPrivacy(mode="local", noise_multiplier=noise_for(TARGET_EPSILON, shard, 32, rounds, 1),
                                max_grad_norm=1.0)
    spent = local_cost(local, shard, 32, 1, 360).after(rounds)
    assert TARGET_EPSILON - 0.05 < spent <= TARGET_EPSILON


@pytest.mark.anyio
async def test_flower_dp_row_is_skipped_without_flower(tmp_path: Path) -> None:
    bench = Bench(None, argparse.Namespace(quick=True, flower_python=None), tmp_path)
    row = await _flower_dp_row(bench, 2, 2.11, {"val_accuracy": 0.31, "round_s": 1.0})
    assert row.status == "skipped" and row.ours == 0.31 and row.theirs is None
    assert "flwr not installed" in row.reason and "--flower-python" in row.reason
