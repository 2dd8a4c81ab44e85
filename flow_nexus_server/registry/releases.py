"""Rows of the registry: releases of a name, and its ``stable`` / ``previous`` aliases."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, select

from flow_nexus_server.registry.versions import parse
from flow_nexus_server.store import ModelAlias, ModelRelease, Store


class Releases:
    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, version: str, directory: str, manifest: dict[str, Any]) -> ModelRelease:
        row = ModelRelease(name=name, version=version, directory=directory, manifest=manifest, evaluations={},
                           created_at=time.time())
        with self.store.session() as s:
            s.add(row)
        return row

    def get(self, name: str, version: str) -> ModelRelease | None:
        with self.store.session() as s:
            return s.scalar(select(ModelRelease).where(ModelRelease.name == name, ModelRelease.version == version))

    def of(self, name: str | None = None) -> list[ModelRelease]:
        """Releases of ``name`` (or of every name), by name then version."""
        with self.store.session() as s:
            q = select(ModelRelease)
            if name is not None:
                q = q.where(ModelRelease.name == name)
            rows = list(s.scalars(q))
        return sorted(rows, key=lambda r: (r.name, parse(r.version)))

    def versions(self, name: str) -> list[str]:
        return [r.version for r in self.of(name)]

    def aliases(self, name: str) -> dict[str, str]:
        """{alias: version} of a name."""
        with self.store.session() as s:
            rows = s.scalars(select(ModelAlias).where(ModelAlias.name == name))
            return {a.alias: a.version for a in rows}

    def set_aliases(self, name: str, aliases: dict[str, str | None]) -> None:
        """Point each alias at a version, or drop it (None), in one transaction."""
        with self.store.session() as s:
            for alias, version in aliases.items():
                s.execute(delete(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias))
                if version is not None:
                    s.add(ModelAlias(name=name, alias=alias, version=version))

    def update(self, name: str, version: str, **values: Any) -> None:
        with self.store.session() as s:
            row = s.scalar(select(ModelRelease).where(ModelRelease.name == name, ModelRelease.version == version))
            for key, value in values.items():
                setattr(row, key, value)

    def add_evaluation(self, name: str, version: str, dataset: str, report: dict[str, Any]) -> None:
        with self.store.session() as s:
            row = s.scalar(select(ModelRelease).where(ModelRelease.name == name, ModelRelease.version == version))
            row.evaluations = {**(row.evaluations or {}), dataset: report}  # a new dict: JSON columns see it
