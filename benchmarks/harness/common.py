"""What every row shares: the jobs measured, the targets, the row record and the baseline runners."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "benchmarks"
DEFAULT_JSON = BENCH_DIR / "results" / "bench.json"
ROWS = ("deploy", "sync", "scaling", "bytes", "allreduce", "collectives", "federated", "byzantine", "privacy",
        "predict", "status", "memory", "lm_sync", "generate", "architectures")
DEFAULT_ROWS = ROWS[:-1]  # architectures trains 20 models three ways (about an hour): asked for by --only
FLOWER_HINT = ("skipped: flwr not installed (pip install flwr[simulation]==1.41.0 in a side venv "
               "and pass --flower-python)")

# The synchronous job of the sync / bytes / predict / status rows (an MLP 784-512-512-512-10).
SYNC_ARCH, SYNC_PRESET = "mlp", "large"
SYNC_JOB = {"dataset": "mnist-5k", "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.05,
            "seed": 0, "validation_split": 0.2}
FED_LAYERS = [{"type": "dense", "units": 64}, {"type": "output"}]  # digits: 64-64-10
FED_JOB = {"dataset": "digits", "batch_size": 32, "optimizer": "adam", "learning_rate": 0.01, "seed": 0,
           "validation_split": 0.2, "local_epochs": 1}

TARGETS = {"sync": 1.15, "allreduce": 0.9, "scaling": 0.95, "collectives": 0.95, "lm_sync": 1.05,
           "predict_p50_ms": 50.0,
           # neural_cluster_status reads the controller's memory (pushed telemetry): p50 / p95 in-memory,
           # p50 over stdio (a front-end relaying to the controller)
           "status_p50_ms": 5.0, "status_p95_ms": 20.0, "status_stdio_p50_ms": 8.0, "deploy_warm_s": 1.0}


class BenchError(RuntimeError):
    """A row could not be measured; the message says why."""


def say(line: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {line}\n")
    sys.stderr.flush()


@dataclass
class Row:
    """One line of the table (a row name may yield several lines, e.g. one per topology)."""

    key: str
    label: str
    unit: str = ""
    ours: float | None = None
    theirs: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("key", "label", "unit", "ours", "theirs", "ratio", "target", "met",
                                              "note", "status", "reason", "details")}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


BASELINE_PRIORITY = {"nice": 0}  # run() sets the server's node_nice: baselines compete for the CPU as nodes do


def run_script(cmd: list[str], timeout: float, marker: str | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a baseline; its JSON is the last stdout line (after ``marker`` when given).

    The baseline runs at the local nodes' CPU priority, in a session (scheduling autogroup) of its
    own as each node does: on a machine others load, a baseline at normal priority would take the
    CPU that the niced nodes yield, and the ratio would measure the priority, not the code."""
    from workers.priority import lower_cpu_priority

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    nice = BASELINE_PRIORITY["nice"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=full_env,
                              start_new_session=True, preexec_fn=lambda: lower_cpu_priority(nice))
    except subprocess.TimeoutExpired as exc:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        raise BenchError(f"{script} ran past {timeout:.0f} s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if marker:
        lines = [ln[len(marker):].strip() for ln in lines if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        text = (proc.stderr or proc.stdout).strip().splitlines()
        keys = ("Error", "error:", "terminate called", "Killed", "Signal")
        why = [ln.strip() for ln in text if any(k in ln for k in keys)][:3] or [ln.strip() for ln in text[-3:]]
        raise BenchError(f"{script} exited {proc.returncode}" + (" without a result" if not lines else "")
                         + f": {' | '.join(why)[:400]}")
    return json.loads(lines[-1])


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: float = 300) -> dict[str, Any]:
    return run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                       str(BENCH_DIR / script), *args], timeout)


def machine_facts() -> dict[str, Any]:
    """The machine the figures were measured on, and its load when the run started."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    import psutil

    mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    return {"cores": os.cpu_count(), "torch": torch_version, "python": platform.python_version(),
            "platform": platform.platform(), "memory_gib": mem_gib,
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "time": time.time()}

