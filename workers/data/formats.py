"""Dataset content to a :class:`Dataset`: CSV/TSV tables, JSON Lines and JSON records, JSON
objects (a ``.json`` file or inline JSON) and text lines.

Inline JSON: ``{"X": [[...], ...], "y": [...]}`` (features under ``X``/``data``/``features``,
labels under ``y``/``labels``/``targets``); number lists give vectors (2-D) or images
(3-D ``(n,H,W)`` or 4-D ``(n,C,H,W)``), strings give a text dataset, strings without labels
give a language-modelling corpus; a list of records reads like JSON Lines.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .dataset import Dataset, DatasetError, check_dataset
from .encoding import is_float, labelled, numeric_features

LABEL_COLUMNS = ("label", "labels", "y", "target", "targets", "class")
TEXT_COLUMNS = ("text",)
INLINE_FEATURE_KEYS = ("X", "data", "features", "x", "texts", "text")
INLINE_LABEL_KEYS = ("y", "labels", "targets", "label", "target")
JSONL_TEXT_KEYS = ("text",)
JSONL_FEATURE_KEYS = ("features", "X", "x", "data")
JSONL_LABEL_KEYS = ("label", "labels", "y", "target", "targets", "class")


def _first_key(obj: dict[str, Any], keys: Iterable[str]) -> str | None:
    for k in keys:
        if k in obj:
            return k
    lower = {k.lower(): k for k in obj}
    for k in keys:
        if k.lower() in lower:
            return lower[k.lower()]
    return None


def from_json_object(obj: Any, name: str, where: str) -> Dataset:
    """A dataset from a JSON object holding features (``X``) and labels (``y``)."""
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{where}: expected a JSON object like {{\"X\": [[...], ...], \"y\": [...]}}, "
            f"got {type(obj).__name__}"
        )
    fkey = _first_key(obj, INLINE_FEATURE_KEYS)
    if fkey is None:
        raise DatasetError(
            f"{where}: no features; put them under \"X\", \"data\" or \"features\" "
            f"(keys found: {', '.join(map(str, obj)) or 'none'})"
        )
    lkey = _first_key(obj, INLINE_LABEL_KEYS)
    feats = obj[fkey]
    if not isinstance(feats, list):
        raise DatasetError(f"{where}: \"{fkey}\" must be a list with one entry per example")
    if not feats:
        raise DatasetError(f"{where}: \"{fkey}\" is empty: no rows")
    labels = obj[lkey] if lkey is not None else None
    if labels is not None and not isinstance(labels, list):
        raise DatasetError(f"{where}: \"{lkey}\" must be a list with one label per example")
    if all(isinstance(f, str) for f in feats):
        return labelled(name, "text", list(feats), labels, where)
    if any(isinstance(f, str) for f in feats):
        raise DatasetError(f"{where}: \"{fkey}\" mixes strings and numbers")
    X, kind = numeric_features(feats, where)
    if labels is None:
        raise DatasetError(
            f"{where}: no labels; put one per example under \"y\", \"labels\" or \"targets\""
        )
    return labelled(name, kind, X, labels, where)


def load_inline(spec: str) -> Dataset:
    """A dataset from inline JSON: an object with features and labels, or a list of records."""
    try:
        obj = json.loads(spec)
    except json.JSONDecodeError as e:
        raise DatasetError(f"inline JSON dataset is malformed: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(obj, list):
        if obj and all(isinstance(o, dict) for o in obj):
            return records_dataset(obj, "inline", "inline dataset")
        raise DatasetError(
            "inline dataset: expected a JSON object like {\"X\": [[...], ...], \"y\": [...]} "
            "or a list of records like [{\"text\": \"...\", \"label\": \"...\"}]"
        )
    return from_json_object(obj, "inline", "inline dataset")


def _pick_column(header: list[str], candidates: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for c in candidates:
        if c in lowered:
            return lowered.index(c)
    return None


def parse_csv(text: str, where: str, delimiter: str) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, non-blank rows) of delimited ``text``."""
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{where}: no rows")
    first = rows[0]
    # The first row is a header when it names a known column (label, text, ...), or when one
    # of its cells is not a number while the next row has a number in that column.
    has_header = _pick_column(first, LABEL_COLUMNS + TEXT_COLUMNS) is not None or (
        len(rows) > 1
        and any(
            not is_float(a) and is_float(b) for a, b in zip(first, rows[1])
        )
    )
    if has_header:
        return [c.strip() for c in first], rows[1:]
    return None, rows


def table_dataset(header: list[str] | None, rows: list[list[str]], name: str, where: str) -> Dataset:
    """A dataset from table rows: a ``text`` column gives text, otherwise numeric features; the
    label column is named or last."""
    if not rows:
        raise DatasetError(f"{where}: no rows (only a header)")
    width = len(header) if header is not None else len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            line = i + (2 if header is not None else 1)
            raise DatasetError(f"{where}: row {line} has {len(r)} columns, expected {width}")
    label_col = _pick_column(header, LABEL_COLUMNS) if header is not None else None
    text_col = _pick_column(header, TEXT_COLUMNS) if header is not None else None
    if text_col is not None:
        texts = [r[text_col] for r in rows]
        if label_col is None and width > 1:
            label_col = width - 1 if text_col != width - 1 else 0
        labels = [r[label_col] for r in rows] if label_col is not None else None
        return labelled(name, "text", texts, labels, where)
    if width < 2:
        raise DatasetError(f"{where}: needs at least one feature column and a label column")
    if label_col is None:
        label_col = width - 1
    feat_cols = [c for c in range(width) if c != label_col]
    labels = [r[label_col] for r in rows]
    try:
        X = np.asarray([[r[c] for c in feat_cols] for r in rows], dtype=np.float32)
    except ValueError:
        for i, r in enumerate(rows):
            for c in feat_cols:
                if not is_float(r[c]):
                    line = i + (2 if header is not None else 1)
                    col = f"'{header[c]}'" if header is not None else str(c + 1)
                    if header is None and all(not is_float(r[k]) for k in feat_cols):
                        raise DatasetError(
                            f"{where}: row {line} is not numeric ({r[c][:40]!r}); for text data "
                            "add a header with a column named 'text' and one named 'label'"
                        ) from None
                    raise DatasetError(
                        f"{where}: row {line}, column {col} is not a number: {r[c][:40]!r}"
                    ) from None
        raise
    X, kind = numeric_features(X, where)
    return labelled(name, kind, X, labels, where)


def jsonl_records(text: str, where: str) -> list[dict[str, Any]]:
    """The JSON objects of the non-blank lines of ``text``."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: line {lineno} is not a JSON object")
        records.append(obj)
    if not records:
        raise DatasetError(f"{where}: no rows")
    return records


def records_dataset(records: list[dict[str, Any]], name: str, where: str) -> Dataset:
    """A dataset from records keyed like the first one: ``text`` or ``features``, and a label key."""
    first = records[0]
    tkey = _first_key(first, JSONL_TEXT_KEYS)
    fkey = None if tkey is not None else _first_key(first, JSONL_FEATURE_KEYS)
    if tkey is None and fkey is None:
        raise DatasetError(
            f"{where}: record 1 has neither a \"text\" nor a \"features\" key "
            f"(keys: {', '.join(map(str, first)) or 'none'})"
        )
    key = tkey or fkey
    lkey = _first_key(first, JSONL_LABEL_KEYS)
    feats, labels = [], []
    for i, rec in enumerate(records, 1):
        if key not in rec:
            raise DatasetError(f"{where}: record {i} has no \"{key}\"")
        if lkey is not None and lkey not in rec:
            raise DatasetError(f"{where}: record {i} has no \"{lkey}\"")
        feats.append(rec[key])
        if lkey is not None:
            labels.append(rec[lkey])
    if tkey is not None:
        bad = next((i for i, t in enumerate(feats, 1) if not isinstance(t, str)), None)
        if bad is not None:
            raise DatasetError(f"{where}: \"{key}\" of record {bad} is not a string")
        return labelled(name, "text", feats, labels if lkey is not None else None, where)
    X, kind = numeric_features(feats, where)
    if lkey is None:
        raise DatasetError(f"{where}: no label key (\"label\", \"y\", \"target\" or \"class\") in the records")
    return labelled(name, kind, X, labels, where)


_TAB_LABEL = re.compile(r"^([^\t]{1,50})\t(.*\S.*)$")


def txt_dataset(lines: list[str], name: str, where: str) -> Dataset:
    """``label<TAB>text`` lines (2 to n/2 distinct labels) as a classification set, other lines
    as a language-modelling corpus."""
    lines = [ln.rstrip("\r\n") for ln in lines if ln.strip()]
    if not lines:
        raise DatasetError(f"{where}: no rows (the file is empty)")
    matches = [_TAB_LABEL.match(ln) for ln in lines]
    if all(m is not None for m in matches):
        labels = [m.group(1).strip() for m in matches]  # type: ignore[union-attr]
        if 2 <= len(set(labels)) <= max(2, len(lines) // 2):
            texts = [m.group(2) for m in matches]  # type: ignore[union-attr]
            return labelled(name, "text", texts, labels, where)
    return check_dataset(Dataset(name, "lm", lines, None, []))
