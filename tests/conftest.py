"""Shared fixtures: a throw-away state home and helpers to look at real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def server_command() -> str:
    """The installed console script beside this interpreter."""
    script = Path(sys.executable).with_name("flow-nexus-server")
    assert script.exists(), "install the package first: pip install -e '.[test]'"
    return str(script)


def server_env(home: Path) -> dict[str, str]:
    return {"FLOW_NEXUS_HOME": str(home), "PATH": os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": "1"}
