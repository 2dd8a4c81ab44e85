"""Path checks: what a caller names may only be read or written under allowed places."""

from __future__ import annotations

import glob
import json
import os
from itertools import islice
from pathlib import Path

from flow_nexus_server.home import is_state_file
from flow_nexus_server.service.errors import NextStep, ServiceError
from workers.protocol import BUILTIN_DATASETS


def under_allowed_root(path: str, roots: list[Path], what: str) -> Path:
    """The resolved absolute path when it lies under one of ``roots``; a ServiceError otherwise."""
    if "\0" in path:
        raise ServiceError(f"{what} {path!r} contains a NUL byte")
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise ServiceError(f"{what} {path[:200]} cannot be resolved ({getattr(exc, 'strerror', None) or exc}); "
                           "give an existing path without symlink loops") from exc
    if not any(resolved == root or root in resolved.parents for root in roots):
        shown = path if str(resolved) == path else f"{path} (which is {resolved})"
        raise ServiceError(f"{what} {shown} is outside the allowed roots ({', '.join(map(str, roots))}); "
                           "set FLOW_NEXUS_DATA_ROOTS to allow another directory")
    if roots and is_state_file(resolved, roots[0]):  # roots[0] is the state home (Settings.allowed_roots)
        raise ServiceError(f"{what} {path} is one of the server's own files (its database and logs); "
                           "name a file of yours")
    return resolved


# Corpora the Flow Nexus guides name that exist only as downloads: this server downloads nothing.
DOWNLOAD_ONLY_DATASETS = ("wikitext-103", "wikitext-2", "wikitext", "openwebtext", "c4", "the-pile", "bookcorpus")


def sandbox_path(spec: str, roots: list[Path]) -> str | None:
    """The guides' sandbox paths: an absolute path or glob such as ``/data/train_*.json`` that lies
    outside every allowed root names the same path inside each node's own sandbox; returned
    relative (``data/train_*.json``). None for anything else: a host path under an allowed root
    (which wins), a relative path (already read in the sandbox), a name or inline JSON."""
    text = spec.strip()
    if not text.startswith("/") or "\0" in text:
        return None
    cut = next((i for i, c in enumerate(text) if c in "*?["), len(text))
    fixed = os.path.dirname(text[:cut])  # the directory it lies in: a symlinked file under a root stays a host path
    try:
        resolved = Path(fixed or "/").resolve()
    except (OSError, RuntimeError):
        return None
    if any(resolved == root or root in resolved.parents for root in roots):
        return None
    relative = text.lstrip("/")
    return relative if relative and ".." not in Path(relative).parts else None


def check_dataset_spec(spec: str, roots: list[Path], inline_limit: int) -> None:
    """Refuse dataset specs that would read outside the allowed places, before any node sees them."""
    text = spec.strip()
    if text.lower() in BUILTIN_DATASETS:
        return
    if text.lower() in DOWNLOAD_ONLY_DATASETS:
        raise ServiceError(f"dataset {text!r} is a download and this server reads no network: for a language model "
                           "use the built-in 'bbc-news-lm' (BBC News text, perplexity reported), or upload your own "
                           "text files (.txt, one document per line) to each worker and name them as the dataset",
                           next_step=NextStep.UPLOAD)
    if text.startswith(("{", "[")):
        size = len(text.encode())
        if size > inline_limit:
            raise ServiceError(f"inline dataset is {size} bytes, the limit is {inline_limit} "
                               "(FLOW_NEXUS_MAX_INLINE_BYTES)", next_step=NextStep.UPLOAD)
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServiceError(f"dataset looks like inline JSON but does not parse: {exc}") from exc
        except RecursionError as exc:
            raise ServiceError("dataset is inline JSON nested too deeply to read; give "
                               "{\"X\": [[...], ...], \"y\": [...]}") from exc
        return
    if Path(text).expanduser().is_absolute():
        check_dataset_files(text, roots)
        return
    if any(part == ".." for part in Path(text).parts):
        raise ServiceError(f"dataset path {text!r} may not contain '..'; relative paths are read inside each "
                           "node's sandbox", next_step=NextStep.UPLOAD)


MAX_GLOB_MATCHES = 10_000


def check_dataset_files(spec: str, roots: list[Path]) -> None:
    """An absolute dataset path, directory or glob: every file a node would read, symlinks and
    '..' resolved, must lie under ``roots`` (the node expands the glob the same way)."""
    pattern = os.path.expanduser(spec)
    if "\0" in pattern:
        raise ServiceError(f"dataset path {spec!r} contains a NUL byte")
    wildcards = [i for i, c in enumerate(pattern) if c in "*?["]
    if wildcards:
        fixed = os.path.dirname(pattern[:wildcards[0]])
        under_allowed_root(fixed or "/", roots, "dataset path")  # where the search starts
        matches = list(islice(glob.iglob(pattern, recursive=True), MAX_GLOB_MATCHES + 1))
        if len(matches) > MAX_GLOB_MATCHES:
            raise ServiceError(f"dataset glob {spec} matches more than {MAX_GLOB_MATCHES} files; narrow it")
    else:
        matches = [pattern]
    for match in matches:
        for path in [match, *_files_in(match)]:
            under_allowed_root(path, roots, "dataset path")
    if ".." in Path(pattern).parts:  # nothing matches now, but a file could appear before the node looks
        raise ServiceError(f"dataset path {spec} may not contain '..'; give the path without it")


def _files_in(path: str) -> list[str]:
    """The entries of a directory (a node reads the data files in it), or [] for anything else."""
    if not os.path.isdir(path):
        return []
    try:
        return [entry.path for entry in os.scandir(path)]
    except OSError:
        return []
