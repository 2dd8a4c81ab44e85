"""Benchmarks of the real server against plain baselines, in one table.

    python benchmarks/run.py [--quick] [--json PATH] [--only ROW...] [--flower-python PATH]

The same as ``flow-nexus-server bench``; the code lives in ``flow_nexus_server/bench.py`` so
the installed console script finds it. Rows: deploy, sync, bytes, allreduce, federated,
predict, status, memory (see that module's docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow_nexus_server.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
