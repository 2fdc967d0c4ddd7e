"""Alembic's entry: runs the migrations on the connection the server hands over (`Database.migrate`), or,
from the `alembic` command line, on the database named in `server/store/alembic.ini`."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from server.store.tables import metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        _migrate(connection)


def _migrate(connection: sa.Connection) -> None:
    # Batch mode: SQLite changes most of a table's shape only by copying it, which Alembic does for us.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
