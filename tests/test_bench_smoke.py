"""`flow-nexus-server bench --quick` on a small subset of rows: the console script finds the harness in
this checkout's benchmarks/, drives the real server (real node processes) and writes every row with
measured, positive figures. Without a checkout (an installed wheel) it says what to do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, server_command, server_env

from flow_nexus_server import cli


def test_bench_quick_subset(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = server_env(tmp_path / "unused-home")  # the bench makes its own temporary state home
    proc = subprocess.run([server_command(), "bench", "--quick", "--only", "deploy", "predict", "status",
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1
    rows = {r["key"]: r for r in result["rows"]}
    expected = {"deploy", "predict.1", "predict.2", "predict.4", "status.memory", "status.stdio"}
    assert set(rows) == expected, sorted(rows)
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["reason"])
        assert row["ours"] is not None and row["ours"] > 0, (key, row)
    # deploy compares with a cold start; latencies come from real timed calls
    assert rows["deploy"]["theirs"] > 0 and rows["deploy"]["ratio"] > 0
    assert rows["deploy"]["details"]["warm"]["runs_s"] and rows["deploy"]["details"]["cold"]["runs_s"]
    assert len(rows["predict.4"]["details"]["times_ms"]) == rows["predict.4"]["details"]["runs"] > 0
    assert all(t > 0 for t in rows["status.memory"]["details"]["times_ms"])
    # the table went to stdout, one line per row (no wall-clock bar: the machine is shared)
    for row in rows.values():
        assert row["label"] in proc.stdout


def test_bench_passes_its_options_to_the_harness(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--only" in out and "--flower-python" in out


def test_bench_without_a_checkout_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    installed = tmp_path / "site-packages" / "flow_nexus_server" / "cli.py"  # no benchmarks/ beside it
    monkeypatch.setattr(cli, "__file__", str(installed))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "clone" in err and "flow-nexus-server bench" in err
    assert err.count("\n") == 1


def test_architecture_twin_trains_on_one_process() -> None:
    """The architectures row's twin (benchmarks/harness/central.py) imports what it uses and learns:
    an MLP on digits for one epoch through the node's own pipeline, schedule and loss (0.84 measured)."""
    import sys

    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.harness.central import train_twin

    torch.set_num_threads(1)
    twin = train_twin("mlp", "digits", epochs=1, batch_size=32, learning_rate=0.003)
    assert twin["steps"] == 22 and twin["n_val"] == 359
    assert twin["val_accuracy"] >= 0.7, twin
