"""Writes (or checks) the public contract as JSON Schema files under ``schemas/``.

``schemas/tools/<tool>.json`` holds each tool's input and output schema and annotations, as
tools/list publishes them; ``schemas/node-api/`` holds the node control API: ``endpoints.json``,
the endpoint table (``workers.api``), and ``<Model>.json`` for each model it names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

from workers import api

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "schemas"


def render() -> dict[str, str]:
    """Relative path -> file text for every schema file."""
    from flow_nexus_server.server import build_server

    tools = anyio.run(build_server().list_tools)
    files: dict[str, str] = {}
    for tool in tools:
        doc = {
            "name": tool.name,
            "title": tool.title,
            "description": tool.description,
            "annotations": tool.annotations.model_dump(by_alias=True, exclude_none=True) if tool.annotations else None,
            "inputSchema": tool.input_schema,
            "outputSchema": tool.output_schema,
        }
        files[f"tools/{tool.name}.json"] = _dump(doc)
    for model in api.models():
        files[f"node-api/{model.__name__}.json"] = _dump(model.model_json_schema())
    files["node-api/endpoints.json"] = _dump(api.describe())
    return files


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def stale_files(out: Path) -> list[str]:
    """Files that differ from what the code generates, plus stray files; [] when up to date."""
    expected = render()
    stale = [rel for rel, text in expected.items()
             if not (out / rel).exists() or (out / rel).read_text() != text]
    present = {str(pth.relative_to(out)) for pth in out.rglob("*.json")} if out.exists() else set()
    return sorted(stale + sorted(present - expected.keys()))


def main(check: bool = False, out: str | None = None) -> int:
    root = Path(out) if out else DEFAULT_DIR
    if check:
        stale = stale_files(root)
        if stale:
            sys.stderr.write("stale schema files (run `flow-nexus-server schemas`): " + ", ".join(stale) + "\n")
            return 1
        return 0
    for old in root.rglob("*.json") if root.exists() else []:
        old.unlink()
    for rel, text in render().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sys.stderr.write(f"wrote schemas to {root}\n")
    return 0
