"""The state home is private: the directory 0700, what is in it readable by its owner only.

It holds the cluster tokens (in the database), the logs and every node's sandbox, so no other
local account may read it. ``prepare_home`` creates it so and tightens one that an older
version (or a loose umask) left readable; files created later are private because the
server's umask is 077 (``cli.main``), nodes start with that umask, and the database and the
log file are created 0600 whatever the umask.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from flow_nexus_server.config import Settings

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# The server's own files directly in the home: no client may read or overwrite them.
HTTP_TOKEN_FILE = "http-token"  # the HTTP front-end's generated bearer token
STATE_FILE_PREFIXES = ("state.db", "server.log", "spawner", "controller", HTTP_TOKEN_FILE)


def is_state_file(path: Path, home: Path) -> bool:
    """True for the server's own files in ``home``: the database (and -wal/-shm), logs, the spawner's and
    controller's sockets, lock and stderr, the HTTP token."""
    return path.parent == home and path.name.startswith(STATE_FILE_PREFIXES)


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """An ``opener`` for ``open()``: a file it creates is 0600 whatever the umask."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def read_or_create_secret(path: Path) -> str:
    """The secret kept in ``path``, created (0600, never over an existing file) when absent or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
        path.unlink()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return secret


def prepare_home(settings: Settings) -> None:
    """Create the home and its clusters directory (0700); tighten what an earlier run left open."""
    home = settings.home
    home.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    settings.clusters_dir.mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
    tightened = [path for path in _home_paths(home) if _make_private(path)]
    if tightened:
        names = [str(p.relative_to(home)) if p != home else "the home itself" for p in tightened]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning("state home %s was open to other users: removed group/other access from %d path(s) "
                    "(%s)", home, len(names), shown)


def _home_paths(home: Path) -> list[Path]:
    """The home, the server's files in it and everything under clusters/, scratch/ and tensorboard/ (no
    symlink followed)."""
    paths = [home, *(p for p in home.iterdir() if is_state_file(p, home))]
    for sub in ("clusters", "scratch", "tensorboard"):
        for top, _dirs, files in os.walk(home / sub):  # symlinked directories are not entered
            paths.append(Path(top))
            paths.extend(Path(top) / name for name in files)
    return paths


def _make_private(path: Path) -> bool:
    """Remove group and other permission bits; True when there were any. Symlinks are left alone."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            return False
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    except FileNotFoundError:  # a node removed it meanwhile
        return False
    return True
