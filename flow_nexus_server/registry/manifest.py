"""A release's manifest: what its folder holds (each file with its sha256), what the model
expects (its contract) and where it came from. Written as ``manifest.json`` beside the artifacts,
so a release folder copied to another machine verifies and registers there unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHUNK = 1 << 20


class ManifestError(ValueError):
    """A manifest or an artifact it lists does not check out; the message is for the user."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """The digest of a JSON value in its canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every plain file of ``directory`` but the manifest: {name: {sha256, bytes}}. Release folders are flat."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST:
            continue
        if path.is_symlink() or not path.is_file():
            raise ManifestError(f"{path} is not a plain file; a release folder holds only plain files")
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def contract(config: dict[str, Any], tokenizer_sha256: str | None) -> dict[str, Any]:
    """What a caller of the model relies on: the input it takes, the labels it answers, its tokenizer.
    A change of any of these is a breaking change (a major version)."""
    task = config.get("task") or {}
    return {"input": {"kind": task.get("kind"), "shape": list(task.get("input_shape") or []),
                      "max_len": config.get("max_len")},
            "labels": list(config.get("label_names") or []),
            "tokenizer_sha256": tokenizer_sha256}


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` once, owner-only; the artifacts it lists become read-only."""
    path = directory / MANIFEST
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    for name in manifest.get("files", {}):
        (directory / name).chmod(0o400)
    return path


def read(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} holds no {MANIFEST}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict) or not isinstance(value.get("files"), dict):
        raise ManifestError(f"{path} is not a release manifest (no 'files' table)")
    return value


def verify(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file is there with its recorded sha256, and nothing else is: else ManifestError
    naming the first file that differs."""
    listed = manifest.get("files") or {}
    for name, entry in sorted(listed.items()):
        if Path(name).name != name or name.startswith("."):
            raise ManifestError(f"the manifest lists {name!r}, which is not a plain file name")
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"artifact {name} of {directory} is missing")
        if sha256_file(path) != entry.get("sha256"):
            raise ManifestError(f"artifact {name} of {directory} does not match its sha256 in the manifest "
                                "(it was changed after the release was registered)")
    extra = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        raise ManifestError(f"{directory} holds files its manifest does not list: {', '.join(extra)}")
