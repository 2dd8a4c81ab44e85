"""Path checks: what a caller names may only be read or written under allowed places."""

from __future__ import annotations

import json
from pathlib import Path

from flow_nexus_server.service.errors import ServiceError
from workers.protocol import BUILTIN_DATASETS


def under_allowed_root(path: str, roots: list[Path], what: str) -> Path:
    """The resolved absolute path when it lies under one of ``roots``; a ServiceError otherwise."""
    if "\0" in path:
        raise ServiceError(f"{what} {path!r} contains a NUL byte")
    resolved = Path(path).expanduser().resolve()
    if any(resolved == root or root in resolved.parents for root in roots):
        return resolved
    raise ServiceError(f"{what} {path} is outside the allowed roots ({', '.join(map(str, roots))}); "
                       "set FLOW_NEXUS_DATA_ROOTS to allow another directory")


def check_dataset_spec(spec: str, roots: list[Path], inline_limit: int) -> None:
    """Refuse dataset specs that would read outside the allowed places, before any node sees them."""
    text = spec.strip()
    if text.lower() in BUILTIN_DATASETS:
        return
    if text.startswith(("{", "[")):
        size = len(text.encode())
        if size > inline_limit:
            raise ServiceError(f"inline dataset is {size} bytes, the limit is {inline_limit} "
                               "(FLOW_NEXUS_MAX_INLINE_BYTES); upload it with neural_node_upload instead")
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServiceError(f"dataset looks like inline JSON but does not parse: {exc}") from exc
        return
    if Path(text).expanduser().is_absolute():
        # Globs: check the fixed part before the first wildcard.
        fixed = text.split("*")[0].split("?")[0].split("[")[0]
        under_allowed_root(fixed or "/", roots, "dataset path")
        return
    if any(part == ".." for part in Path(text).parts):
        raise ServiceError(f"dataset path {text!r} may not contain '..'; relative paths are read inside each "
                           "node's sandbox (see neural_node_upload)")
