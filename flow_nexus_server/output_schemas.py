"""Published output schemas, flattened: every MCP client validates each reply against its tool's
output schema, and on a status call that validation costs more than the server's own work.
Inlined references and no auto-generated titles validate faster and read more easily; what they
accept is the same. Nullable fields keep ``anyOf`` (a ``type`` list is less portable: the
Inspector's --strict check warns about it), except in the polled status tools' replies, which
leave out what is not known yet (``absent_when_unknown``)."""

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


def absent_when_unknown(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a sparse reply (``exclude_none``): a nullable field becomes its non-null type and
    optional, since the reply leaves it out instead of sending null. Only model fields change: the
    values of free-form maps and lists keep their nulls (``exclude_none`` keeps those)."""

    def non_null(prop: Any) -> Any:
        branches = prop.get("anyOf") if isinstance(prop, dict) else None
        if not branches or {"type": "null"} not in branches or len(branches) != 2:
            return walk(prop)
        (other,) = [b for b in branches if b != {"type": "null"}]
        rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
        return walk({**other, **rest})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: walk(value) for key, value in node.items() if key not in ("properties", "required")}
        if "properties" in node:
            props = node["properties"]
            out["properties"] = {name: non_null(sub) for name, sub in props.items()}
            required = [name for name in node.get("required", []) if not _nullable(props.get(name))]
            if required:
                out["required"] = required
        elif "required" in node:
            out["required"] = node["required"]
        return out

    return walk(schema)


def _nullable(prop: Any) -> bool:
    return isinstance(prop, dict) and {"type": "null"} in prop.get("anyOf", [])


def _is_auto_title(title: Any, name: str) -> bool:
    return title == name.replace("_", " ").title()


def flatten_output_schemas(mcp: MCPServer) -> None:
    """Flatten every registered tool's published output schema in place (sparse replies: nulls left
    out, see ``absent_when_unknown``). The SDK reads ``fn_metadata.output_schema`` live; the replies
    themselves are still validated on the server against their pydantic models."""
    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001 - the SDK has no public way to reach a Tool
        meta = tool.fn_metadata
        if meta.output_schema is not None:
            flat = flatten(meta.output_schema)
            meta.output_schema = absent_when_unknown(flat) if getattr(tool.fn, "sparse_reply", False) else flat
