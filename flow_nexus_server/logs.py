"""Logging to stderr and to the state home's log file; never to stdout (the MCP stream on stdio)."""

from __future__ import annotations

import logging
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from flow_nexus_server.home import open_private

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PrivateRotatingFileHandler(RotatingFileHandler):
    """Creates the log (and each new file after a rotation) 0600, whatever the umask."""

    def _open(self):  # type: ignore[no-untyped-def]
        return self._builtin_open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                                  opener=open_private)


class DropQueryStrings(logging.Filter):
    """For uvicorn's access log: the path without its query string, which may carry a secret
    (``?access_token=...``) that must not reach the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a.split("?", 1)[0] if isinstance(a, str) else a for a in record.args)
        return True


def setup_logging(log_file: Path, verbose: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stderr)
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    file = PrivateRotatingFileHandler(log_file, maxBytes=10 << 20, backupCount=3, encoding="utf-8")
    file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(file)
    for noisy in ("httpx", "httpcore", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
