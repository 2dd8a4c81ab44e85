"""Benchmarks of the real server against plain baselines, in one table.

    python benchmarks/run.py [--quick] [--json PATH] [--only ROW...] [--flower-python PATH] [--home DIR]

The same as ``flow-nexus-server bench`` run from this checkout; the harness is ``benchmarks/harness/``
(its package docstring lists the rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
