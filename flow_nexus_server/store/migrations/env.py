"""Alembic environment: the store's tables; the connection is the store's own (``upgrade``) or,
from the alembic command line, one to FLOW_NEXUS_DB_URL (default: the home's state.db)."""

from alembic import context
from sqlalchemy import create_engine

from flow_nexus_server.store.tables import Base


def run_migrations(connection) -> None:
    # Batch mode: SQLite alters a table by copying it, which autogenerate then writes for us.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    from flow_nexus_server.config import Settings

    with create_engine(Settings.from_env().db_url).begin() as own:
        run_migrations(own)
