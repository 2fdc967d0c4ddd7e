"""The durable store: every accepted queue request and every generated file's owner, so that nothing
accepted is lost across a crash or restart.

One table definition (`tables.py`) serves SQLite (the default, one file in the data folder) and
PostgreSQL; schema changes are Alembic migrations (`migrations/versions/`), applied at startup.
"""
