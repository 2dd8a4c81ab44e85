"""Alembic migrations of the state database, applied by the store whenever it opens one.

Opening costs one small query when the database is at ``HEAD``. A new (empty) database gets the
declared tables stamped ``HEAD``, as Alembic's docs advise for building one from scratch
(tests/test_migrations.py checks that the migrations build exactly those tables); either way
alembic is not even imported, which would add a few hundred ms to a start. A database behind
``HEAD`` is upgraded by alembic, and one made by 0.1.0 (tables but no ``alembic_version``) is
first stamped ``BASELINE``, that release's schema. New revisions: see alembic.ini.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Connection, Engine, MetaData, PrimaryKeyConstraint, String, Table, inspect

from flow_nexus_server.store.tables import Base

BASELINE = "0001"  # the schema of 0.1.0, made by create_all before there were migrations
HEAD = "0002"  # the newest revision in versions/ (tests/test_migrations.py checks it)
SCRIPTS = Path(__file__).resolve().parent
# Alembic's own version table, as alembic creates it.
VERSION_TABLE = Table("alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
                      PrimaryKeyConstraint("version_num", name="alembic_version_pkc"))


def upgrade(engine: Engine) -> None:
    """Bring the database to HEAD, keeping every row."""
    with engine.connect() as conn:
        if current_revision(conn) == HEAD:
            return
        conn.rollback()
        if conn.dialect.name == "sqlite":
            # One process migrates: another one opening the same file waits here, then finds HEAD.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        revision = current_revision(conn)
        if revision is None and not inspect(conn).get_table_names():
            Base.metadata.create_all(conn)
            VERSION_TABLE.create(conn)
            conn.execute(VERSION_TABLE.insert().values(version_num=HEAD))
        elif revision != HEAD:
            _run_alembic(conn, revision)
        conn.commit()


def current_revision(conn: Connection) -> str | None:
    """The database's revision; None for a new database or one made before migrations."""
    if not inspect(conn).has_table(VERSION_TABLE.name):
        return None
    return conn.execute(VERSION_TABLE.select()).scalar()


def _run_alembic(conn: Connection, revision: str | None) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = conn
    if revision is None:
        command.stamp(config, BASELINE)  # made by 0.1.0: its tables are the baseline's
    try:
        command.upgrade(config, "head")
    except CommandError as exc:  # a revision these scripts do not know
        raise RuntimeError(f"the state database cannot be brought to revision {HEAD} ({exc}); was it made by a "
                           "newer flow-nexus-server?") from exc
