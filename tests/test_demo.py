"""The newcomer's first command: the demo finishes, reaches the accuracy bar, leaves nothing behind."""

from __future__ import annotations

import re
import subprocess

from conftest import server_command, server_env


def test_demo_runs_end_to_end(home):
    proc = subprocess.run([server_command(), "demo"], env={**server_env(home), "COLUMNS": "120"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", proc.stdout).group(1))
    assert accuracy >= 0.88
    assert "no process left behind" in proc.stdout
    assert re.search(r"positive .*I love this airline", proc.stdout)
