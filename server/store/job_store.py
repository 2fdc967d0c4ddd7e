"""Accepted queue requests, kept from acceptance to retention's end.

Records are written when they are accepted, start and complete; step logs between those points live in
memory only. The scheduler sees the store through `JobStore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from server.jobs import JobRecord
from server.store.database import Database
from server.store.tables import jobs

WRITE_ERRORS = (SQLAlchemyError, OSError)  # what a write can raise: a full disk, a store gone read-only


class JobStore(Protocol):
    def save(self, record: JobRecord) -> None: ...
    def load_all(self) -> list[JobRecord]: ...
    def delete_finished_before(self, cutoff: float) -> list[str]: ...
    def settle_webhook(self, request_id: str) -> None: ...


_INSERTS: dict[str, Callable[[sa.Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class SqlJobStore:
    def __init__(self, database: Database) -> None:
        self._engine = database.engine
        insert = _INSERTS[database.url.get_backend_name()](jobs)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[jobs.c.request_id],
            set_={
                column.name: insert.excluded[column.name] for column in jobs.columns if not column.primary_key
            },
        )

    def save(self, record: JobRecord) -> None:
        row = {column.name: getattr(record, column.name) for column in jobs.columns}
        with self._engine.begin() as connection:
            connection.execute(self._upsert, row)

    def load_all(self) -> list[JobRecord]:
        with self._engine.connect() as connection:
            rows = connection.execute(sa.select(jobs).order_by(jobs.c.created_at)).all()
        return [_record(row._mapping) for row in rows]

    def settle_webhook(self, request_id: str) -> None:
        """The request's webhook arrived or was given up on: not to be sent again after a restart. (A
        request forgotten meanwhile stays forgotten.)"""
        with self._engine.begin() as connection:
            connection.execute(
                sa.update(jobs).where(jobs.c.request_id == request_id).values(webhook_pending=False)
            )

    def delete_finished_before(self, cutoff: float) -> list[str]:
        """Forget requests that completed before `cutoff`; returns their ids."""
        finished_before = jobs.c.finished_at < cutoff
        with self._engine.begin() as connection:
            ids = connection.execute(sa.select(jobs.c.request_id).where(finished_before)).scalars().all()
            connection.execute(sa.delete(jobs).where(finished_before))
        return list(ids)


def _record(row: Any) -> JobRecord:
    record = JobRecord(**row, durable=True)
    record.sync_mode = bool(record.request_input.get("sync_mode", False))
    return record
