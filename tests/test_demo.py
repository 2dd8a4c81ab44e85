"""The newcomer's first command: the demo finishes, reaches the accuracy bar, leaves nothing behind;
it runs in $FLOW_NEXUS_HOME and keeps the server's log lines off the terminal."""

from __future__ import annotations

import re
import subprocess

from conftest import server_command, server_env

# A line as the server's log formatter writes it: "2026-01-01 12:00:00,123 INFO name: message".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", re.M)


def test_demo_runs_end_to_end(home):
    proc = subprocess.run([server_command(), "demo"], env={**server_env(home), "COLUMNS": "120"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", proc.stdout).group(1))
    assert accuracy >= 0.88
    assert "no process left behind" in proc.stdout
    assert re.search(r"positive .*I love this airline", proc.stdout)
    # The server's log went to the log file of the home named by FLOW_NEXUS_HOME, not to the terminal.
    assert not LOG_LINE.search(proc.stdout), LOG_LINE.search(proc.stdout).group(0)
    assert not LOG_LINE.search(proc.stderr), proc.stderr[-3000:]
    cluster_id = re.search(r"cluster (\S+): \d+ nodes", proc.stdout).group(1)
    log = (home / "server.log").read_text()
    assert LOG_LINE.search(log) and cluster_id in log
