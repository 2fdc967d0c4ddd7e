"""Accepted queue requests, kept from acceptance to retention's end: the truth about finished ones.

Records are written when they are accepted, start and complete; step logs between those points live in
memory only. Memory holds the unfinished requests; a finished one is read back by its id when asked for,
so retained history costs no memory, and a restart reads only what has still to run (and the webhooks
still to send). The scheduler sees the store through `JobStore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from server.jobs import JobRecord, JobStatus
from server.store.database import Database
from server.store.tables import jobs

WRITE_ERRORS = (SQLAlchemyError, OSError)  # what a write can raise: a full disk, a store gone read-only


class JobStore(Protocol):
    def save(self, record: JobRecord) -> None: ...
    def load(self, request_id: str) -> JobRecord | None: ...
    def load_unfinished(self) -> list[JobRecord]: ...
    def load_unsent_webhooks(self) -> list[JobRecord]: ...
    def delete_finished_before(self, cutoff: float) -> int: ...
    def settle_webhook(self, request_id: str) -> None: ...


_INSERTS: dict[str, Callable[[sa.Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class SqlJobStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        insert = _INSERTS[database.url.get_backend_name()](jobs)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[jobs.c.request_id],
            set_={
                column.name: insert.excluded[column.name] for column in jobs.columns if not column.primary_key
            },
        )

    def save(self, record: JobRecord) -> None:
        row = {column.name: getattr(record, column.name) for column in jobs.columns}
        self._database.run(lambda connection: connection.execute(self._upsert, row))

    def load(self, request_id: str) -> JobRecord | None:
        rows = self._select(jobs.c.request_id == request_id)
        return rows[0] if rows else None

    def load_unfinished(self) -> list[JobRecord]:
        """Queued and running requests, oldest first: what a restart has to run."""
        return self._select(jobs.c.status != JobStatus.COMPLETED)

    def load_unsent_webhooks(self) -> list[JobRecord]:
        """Completed requests whose webhook was neither delivered nor given up on."""
        return self._select(jobs.c.webhook_pending.is_(True))

    def request_ids(self) -> list[str]:
        """Every request id the store holds, repeats included (for fault checks: there must be none)."""
        return self._database.run(
            lambda connection: list(connection.execute(sa.select(jobs.c.request_id)).scalars())
        )

    def _select(self, where: sa.ColumnElement[bool]) -> list[JobRecord]:
        query = sa.select(jobs).where(where).order_by(jobs.c.created_at)
        rows = self._database.run(lambda connection: connection.execute(query).all())
        return [_record(row._mapping) for row in rows]

    def settle_webhook(self, request_id: str) -> None:
        """The request's webhook arrived or was given up on: not to be sent again after a restart. (A
        request forgotten meanwhile stays forgotten.)"""
        settle = sa.update(jobs).where(jobs.c.request_id == request_id).values(webhook_pending=False)
        self._database.run(lambda connection: connection.execute(settle))

    def delete_finished_before(self, cutoff: float) -> int:
        """Forget requests that completed before `cutoff` (by the finish-time index); returns how many."""
        delete = sa.delete(jobs).where(jobs.c.finished_at < cutoff)
        return self._database.run(lambda connection: connection.execute(delete).rowcount)


def _record(row: Any) -> JobRecord:
    record = JobRecord(**row, durable=True)
    record.sync_mode = bool(record.request_input.get("sync_mode", False))
    return record
