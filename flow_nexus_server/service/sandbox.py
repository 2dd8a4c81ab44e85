"""Sandbox files: the names a client may write in a node's sandbox, uploads that follow no
symlink, the sandbox quota, and node logs.

``SandboxFiles`` is a mixin of ``ClusterService`` (``service.clusters``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path

from flow_nexus_server import replies as r
from flow_nexus_server.launchers.base import log_tail
from flow_nexus_server.launchers.local import NODE_LOG
from flow_nexus_server.service.errors import Conflict, ServiceError
from flow_nexus_server.states import LIVE_NODE_STATES

log = logging.getLogger(__name__)

RESERVED_NAMES = {"agent.json", NODE_LOG}
NAME_MAX = 255  # bytes in one path component (Linux file systems)
PATH_MAX = 4096  # bytes in a whole path, with its terminating NUL


def in_sandbox_name(name: str) -> str:
    """The guides write sandbox files as absolute paths (``/data/train_shard_1.json``): that path
    inside the node's sandbox. Relative names are already inside it."""
    return name.lstrip("/") if name.startswith("/") and name.strip("/") else name


def safe_path(root: Path, name: str) -> Path:
    """``root / name`` when it stays inside ``root`` (no absolute path, no '..', no symlink escape)."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise ServiceError(f"file name {name!r} must be a relative path inside the node's sandbox, e.g. data/mine.csv")
    if any(part == ".." for part in Path(name).parts):
        raise ServiceError(f"file name {name!r} may not contain '..'; give a path inside the node's sandbox")
    check_name_length(root, name)
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ServiceError(f"file name {name[:80]!r} cannot be used ({getattr(exc, 'strerror', None) or exc}); "
                           "choose another name") from exc
    if target != root and root not in target.parents:
        raise ServiceError(f"file name {name!r} leads outside the node's sandbox {root} (through a symlink); "
                           "choose another name")
    if target.name in RESERVED_NAMES or target.is_dir():
        raise ServiceError(f"{name!r} is reserved or a directory in the node's sandbox; choose another file name")
    return target


def check_name_length(root: Path, name: str) -> None:
    """The file system's limits as a sentence, rather than an error from deep inside a write."""
    try:
        parts = [part.encode("utf-8") for part in Path(name).parts]
    except UnicodeEncodeError as exc:
        raise ServiceError(f"file name {name[:80]!r} is not valid Unicode text; choose another name") from exc
    longest = max(parts, key=len)
    if len(longest) > NAME_MAX:
        raise ServiceError(f"file name is too long: {longest[:40].decode('utf-8', 'replace')!r}... is {len(longest)} "
                           f"bytes, the limit is {NAME_MAX} bytes per path component; choose a shorter name")
    whole = len(os.fsencode(root)) + 1 + len(name.encode("utf-8"))
    if whole >= PATH_MAX:
        raise ServiceError(f"file name is too long: the path in the sandbox would be {whole} bytes, the limit is "
                           f"{PATH_MAX - 1} bytes (PATH_MAX); choose a shorter name")


def write_no_follow(root: Path, relative: Path, data: bytes) -> None:
    """Write ``root / relative`` without following a symlink anywhere below ``root``.

    Each directory on the way is opened with O_NOFOLLOW (created 0700 when missing); the data
    goes to a fresh 0600 file under a random name (O_CREAT | O_EXCL | O_NOFOLLOW) and is renamed
    over the name, which replaces a symlink of that name instead of writing through it.
    """
    *dirs, name = relative.parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:  # ELOOP (a symlink) or ENOTDIR (a file)
                raise ServiceError(f"{part!r} in {str(relative)!r} is a symlink or a file, not a directory of the "
                                   "node's sandbox; choose another name") from exc
            os.close(fd)
            fd = sub
        tmp = f".upload-{secrets.token_hex(8)}.part"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=fd)
            except FileNotFoundError:
                pass
            if isinstance(exc, IsADirectoryError):
                raise ServiceError(f"{str(relative)!r} is a directory in the node's sandbox; choose another "
                                   "file name") from exc
            raise
    finally:
        os.close(fd)


class SandboxFiles:
    # ------------------------------------------------------------------ upload
    def upload(self, node_id: str, file_name: str, content: str, encoding: str) -> r.UploadReply:
        node = self.get_node(node_id)
        self.get_cluster(node.cluster_id)
        if node.status not in LIVE_NODE_STATES:
            raise Conflict(f"node {node_id} is {node.status}; upload to a running node")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ServiceError(f"content is not valid base64 ({exc}); send text with encoding='text'") from exc
        else:
            data = content.encode("utf-8")
        if len(data) > self.settings.limits.max_upload_bytes:
            raise ServiceError(f"the file is {len(data)} bytes, the upload limit is "
                               f"{self.settings.limits.max_upload_bytes} "
                               "bytes per file (FLOW_NEXUS_MAX_UPLOAD_BYTES)")
        sandbox = Path(node.sandbox).resolve()
        file_name = in_sandbox_name(file_name)
        safe_path(sandbox, file_name)  # a clear sentence for the common mistakes; write_no_follow enforces
        relative = Path(file_name)  # no '..', no absolute path: checked above
        target = sandbox / relative
        used = sum(f.stat().st_size for f in sandbox.rglob("*") if f.is_file())
        limit = self.settings.limits.max_sandbox_bytes
        if used + len(data) > limit:
            raise ServiceError(f"node {node_id}'s sandbox holds {used} bytes; {len(data)} more would pass its limit of "
                               f"{limit} bytes (FLOW_NEXUS_MAX_SANDBOX_BYTES)")
        write_no_follow(sandbox, relative, data)
        rel = str(relative)
        self.event(node.cluster_id, "file_uploaded", f"{len(data)} bytes written to {node_id}:{rel}", node_id=node_id)
        return r.UploadReply(success=True, node_id=node_id, path=str(target), relative_path=rel, bytes=len(data))

    # -------------------------------------------------------------------- logs
    def node_logs(self, node_id: str, tail: int) -> r.NodeLogsReply:
        node = self.get_node(node_id)
        path = Path(node.sandbox) / NODE_LOG
        text = log_tail(path, tail)
        return r.NodeLogsReply(success=True, node_id=node_id, status=node.status, log_path=str(path),
                               lines=len(text.splitlines()), log=text)
