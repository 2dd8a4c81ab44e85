"""User files: which files a spec names (path, directory or glob, confined to the node's
sandbox), reading them (optionally gzipped) and parsing them by suffix."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any

from ..paths import PathRefused, confine, expand_glob
from .dataset import Dataset, DatasetError
from .formats import from_json_object, jsonl_records, parse_csv, records_dataset, table_dataset, txt_dataset

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".txt": "txt",
    ".text": "txt",
}


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    return text.lstrip("\ufeff")


def _json_file(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path.name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def has_glob(s: str) -> bool:
    """Whether ``s`` holds a glob pattern character."""
    return any(c in s for c in "*?[")


def resolve_paths(spec: str, sandbox: Path | None) -> list[Path]:
    """Files named by ``spec`` (path, directory or glob), fully resolved; [] when nothing matches.

    Each file is checked after ``..``, symbolic links and glob expansion against the node's
    sandbox and allowed roots (``workers.paths``); one outside refuses the whole spec.
    """
    raw = os.path.expanduser(spec.strip())
    try:
        if has_glob(raw):
            return [p for p in expand_glob(raw, sandbox, what="dataset path") if p.is_file()]
        p = confine(raw, sandbox, what="dataset path")
        if p.is_dir():
            found = sorted(confine(os.path.join(raw, q.name), sandbox, what="dataset path")
                           for q in p.iterdir() if q.is_file() and _file_format(q) is not None)
            if not found:
                raise DatasetError(
                    f"directory {p} holds no .csv, .tsv, .jsonl, .json or .txt files to load"
                )
            return found
    except PathRefused as exc:
        raise DatasetError(str(exc)) from None
    return [p] if p.is_file() else []


def load_files(paths: list[Path], name: str) -> Dataset:
    """One dataset from files of one format (CSV/TSV, JSON Lines, one JSON, text lines)."""
    formats = {p: _file_format(p) for p in paths}
    unknown = [p for p, f in formats.items() if f is None]
    if unknown:
        raise DatasetError(
            f"{unknown[0].name}: unsupported file type; use .csv, .tsv, .jsonl, .json or .txt "
            "(optionally .gz)"
        )
    kinds = set(formats.values())
    if len(kinds) > 1:
        raise DatasetError(f"{name}: the files mix formats ({', '.join(sorted(kinds))}); use one format")
    fmt = kinds.pop()
    where = paths[0].name if len(paths) == 1 else f"{name} ({len(paths)} files)"
    if fmt in ("csv", "tsv"):
        delim = "," if fmt == "csv" else "\t"
        header: list[str] | None = None
        rows: list[list[str]] = []
        for p in paths:
            h, r = parse_csv(_read_text(p), p.name, delim)
            if rows or header is not None:
                if (h is None) != (header is None) or (
                        h is not None and [c.lower() for c in h] != [c.lower() for c in header or []]):
                    raise DatasetError(f"{p.name}: its columns differ from {paths[0].name}")
            header = h
            rows.extend(r)
        return table_dataset(header, rows, name, where)
    if fmt == "jsonl":
        records: list[dict[str, Any]] = []
        for p in paths:
            records.extend(jsonl_records(_read_text(p), p.name))
        return records_dataset(records, name, where)
    if fmt == "json":
        objs = [_json_file(p) for p in paths]
        if all(isinstance(o, list) for o in objs):  # arrays of records ({"text", "label"}), read like JSON Lines
            records = [rec for o in objs for rec in o]
            if not records:
                raise DatasetError(f"{where}: no rows")
            if not all(isinstance(o, dict) for o in records):
                raise DatasetError(f"{where}: expected an object with \"X\" and \"y\", or a list of objects")
            return records_dataset(records, name, where)
        if len(paths) > 1:
            raise DatasetError(f"{name}: several .json files must each hold an array of records; give one .json "
                               "file with \"X\" and \"y\", or use .jsonl with one example per line")
        return from_json_object(objs[0], name, where)
    lines: list[str] = []
    for p in paths:
        lines.extend(_read_text(p).splitlines())
    return txt_dataset(lines, name, where)
