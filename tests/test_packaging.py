"""The `worker` extra lists exactly what workers/ imports besides torch; the worker image and the
`ray` extra install it instead of lists of their own."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 or newer

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
INSTALLED_ON_ITS_OWN = {"torch"}  # the right CUDA or CPU build, from its own index


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def third_party_imports(tree: Path) -> set[str]:
    """Top-level names of the modules imported anywhere under ``tree`` that are not the standard library's."""
    names = set()
    for path in tree.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", tree.name}


def test_the_worker_extra_is_what_workers_import():
    distributions = packages_distributions()
    imported = third_party_imports(ROOT / "workers") - INSTALLED_ON_ITS_OWN
    unknown = sorted(name for name in imported if name not in distributions)
    assert unknown == [], f"workers/ imports modules no installed distribution provides: {unknown}"
    needed = {requirement_name(dist) for name in imported for dist in distributions[name]}
    assert {requirement_name(r) for r in PROJECT["optional-dependencies"]["worker"]} == needed


def test_the_ray_extra_and_the_worker_image_install_the_worker_extra():
    assert "flow-nexus-server[worker]" in PROJECT["optional-dependencies"]["ray"]
    dockerfile = (ROOT / "docker" / "Dockerfile.worker").read_text(encoding="utf-8")
    assert "requirements.py /tmp/build/pyproject.toml worker" in dockerfile
    hand_written = [name for name in map(requirement_name, PROJECT["optional-dependencies"]["worker"])
                    if re.search(rf"\b{re.escape(name)}\b", dockerfile)]
    assert hand_written == [], "the image lists packages the extra already lists"
