"""Published output schemas, flattened: every MCP client validates each reply against its tool's
output schema, and on a status call that validation costs more than the server's own work.
Inlined references and no auto-generated titles validate faster and read more easily; what they
accept is the same. Nullable fields keep ``anyOf`` (a ``type`` list would validate no faster and
is less portable: the Inspector's --strict check warns about it)."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer


def flatten(schema: dict[str, Any]) -> dict[str, Any]:
    """The same schema with ``$ref``s inlined and titles that only repeat a field's name dropped.
    Our reply models are not recursive, so inlining terminates."""
    defs = schema.get("$defs", {})

    def walk(node: Any, name: str | None = None) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$defs" or (key == "title" and name is not None and _is_auto_title(value, name)):
                continue
            if key == "properties":
                out[key] = {prop: walk(sub, prop) for prop, sub in value.items()}
            else:
                out[key] = walk(value)
        return out

    return walk(schema)


def _is_auto_title(title: Any, name: str) -> bool:
    return title == name.replace("_", " ").title()


def flatten_output_schemas(mcp: MCPServer) -> None:
    """Flatten every registered tool's published output schema in place. The SDK reads
    ``fn_metadata.output_schema`` live; the replies themselves are still validated on the server
    against their pydantic models."""
    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001 - the SDK has no public way to reach a Tool
        meta = tool.fn_metadata
        if meta.output_schema is not None:
            meta.output_schema = flatten(meta.output_schema)
