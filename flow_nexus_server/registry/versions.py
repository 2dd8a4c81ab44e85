"""Semantic versions of a model name: the next one, and ordering."""

from __future__ import annotations

import re

SEMVER = re.compile(r"^(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})$")
ALIASES = ("stable", "previous")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse(version: str) -> tuple[int, int, int]:
    m = SEMVER.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, like 1.2.0)")
    return int(m[1]), int(m[2]), int(m[3])


def next_version(existing: list[str], breaking: bool) -> str:
    """1.0.0 for a new name; else the newest bumped: major for a changed contract, minor otherwise."""
    if not existing:
        return "1.0.0"
    major, minor, _ = max(parse(v) for v in existing)
    return f"{major + 1}.0.0" if breaking else f"{major}.{minor + 1}.0"


def newest(versions: list[str]) -> str | None:
    return max(versions, key=parse, default=None)
