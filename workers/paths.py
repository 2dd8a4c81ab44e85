"""Node-side path confinement: a node reads and writes only inside its sandbox and its allowed roots.

Every path a client names (a dataset file or glob, a model to load, an export destination,
``resume_from``, ``checkpoint_dir``) goes through :func:`confine` or :func:`expand_glob`, which
resolve it fully (``os.path.realpath``: ``..`` and every symbolic link) and refuse what lands
outside. Relative paths are relative to the sandbox and must stay inside the sandbox itself,
even when the sandbox lies under an allowed root: a symlink ``x -> /etc`` planted in the sandbox
does not make ``x/passwd`` readable.

``ALLOWED`` holds the node's roots. The agent sets it once at start-up with :func:`configure`
(from ``--sandbox`` and each ``--allowed-root``), so the data loader and the trainer need no extra
parameter. Its default has no sandbox and no extra roots: a caller that passes a sandbox is
confined to that sandbox alone; code that passes none (library use on the host: tests, the
server's benchmarks) is not confined.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class PathRefused(ValueError):
    """A client-named path lies outside the node's sandbox and allowed roots; the message says so."""


@dataclass(frozen=True)
class Roots:
    sandbox: Path | None = None  # None: not a node process (see the module docstring)
    extra: tuple[Path, ...] = ()  # the --allowed-root directories, fully resolved


ALLOWED = Roots()


def configure(sandbox: str | Path, roots: Iterable[str | Path] = ()) -> Roots:
    """Set ``ALLOWED`` for this process (the agent does, once, at start-up)."""
    global ALLOWED
    ALLOWED = Roots(_real(sandbox), tuple(_real(r) for r in roots))
    return ALLOWED


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _where(raw: str, sandbox: Path | None, roots: Iterable[Path] | None) -> tuple[Path | None, str, list[Path]]:
    """(the sandbox or None when not confined, the path to resolve, the directories it may resolve into)."""
    box = _real(sandbox) if sandbox is not None else ALLOWED.sandbox
    if box is None:
        return None, raw, []
    if not os.path.isabs(raw):
        return box, str(box / raw), [box]  # relative: the sandbox alone, symlinks included
    extra = ALLOWED.extra if roots is None else tuple(_real(r) for r in roots)
    return box, raw, [box, *extra]


def _refusal(what: str, raw: str, allowed: list[Path]) -> PathRefused:
    if not os.path.isabs(raw):
        return PathRefused(f"{what} '{raw}' leads out of this node's sandbox (through '..' or a symbolic "
                           "link); a relative path must stay inside the sandbox")
    return PathRefused(f"{what} '{raw}' lies outside this node's sandbox and allowed roots "
                       f"({', '.join(map(str, allowed))}); the roots are the server's FLOW_NEXUS_DATA_ROOTS "
                       "as they were when the node started (redeploy nodes after changing them)")


def _check_text(raw: str, what: str) -> None:
    if "\0" in raw:
        raise PathRefused(f"{what} contains a NUL byte")


def confine(path: str | Path, sandbox: Path | None = None, roots: Iterable[Path] | None = None,
            what: str = "path") -> Path:
    """``path`` fully resolved, when it lies in the sandbox or (absolute paths only) an allowed root.

    ``sandbox`` and ``roots`` default to ``ALLOWED``; raises :class:`PathRefused` otherwise.
    A path that does not exist yet (an export destination) is resolved as far as it exists.
    """
    raw = os.path.expanduser(str(path))
    _check_text(raw, what)
    box, full, allowed = _where(raw, sandbox, roots)
    resolved = _real(full)
    if box is None or any(_inside(resolved, a) for a in allowed):
        return resolved
    raise _refusal(what, raw, allowed)


def has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_glob(pattern: str, sandbox: Path | None = None, roots: Iterable[Path] | None = None,
                what: str = "path") -> list[Path]:
    """The matches of ``pattern``, sorted and fully resolved; refuses the whole pattern when any
    match (after ``..`` and symbolic links) lies outside the sandbox and allowed roots."""
    raw = os.path.expanduser(pattern)
    _check_text(raw, what)
    box, full, allowed = _where(raw, sandbox, roots)
    if box is not None:
        # The fixed part before the first wildcard must be allowed too: `/**/*.csv` is refused
        # before it walks the whole file system.
        parts = Path(full).parts
        fixed = _real(os.path.join(*parts[: next((i for i, x in enumerate(parts) if has_glob(x)), len(parts))]))
        if not any(_inside(fixed, a) for a in allowed):
            raise _refusal(what, raw, allowed)
    resolved = [_real(m) for m in sorted(glob.glob(full, recursive=True))]
    if box is not None and not all(any(_inside(r, a) for a in allowed) for r in resolved):
        # No match is named: the reply must not list what lies outside.
        raise PathRefused(f"{what} '{raw}' matches a file that resolves outside this node's sandbox"
                          f"{'' if len(allowed) == 1 else ' and allowed roots'} (through '..' or a symbolic "
                          "link); every matched file must lie inside")
    return resolved
