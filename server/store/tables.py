"""The store's tables, defined once: SQLAlchemy Core, portable across SQLite and PostgreSQL.

A `jobs` column is named after the `JobRecord` field it holds, and its type converts that field's value
(dataclasses and enums as JSON text or plain values), so a record and a row map onto each other
column by column, with nothing written twice.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from pipeline.messages import GenerationParams
from server.fetch.lora_fetcher import LoraRequest
from server.jobs import JobStatus, LogEntry, Priority
from server.outcome import Outcome


class Json(sa.TypeDecorator[Any]):
    """A JSON value kept as text: the same on every database, and what stores of older versions hold."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(self.to_json(value))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else self.from_json(json.loads(value))

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, data: Any) -> Any:
        return data


class Dataclass(Json):
    """One frozen dataclass (`many`: a sequence of them) as a JSON object (array)."""

    cache_ok = True

    def __init__(self, cls: type[Any], many: bool = False) -> None:
        super().__init__()
        self.cls = cls
        self.many = many

    def to_json(self, value: Any) -> Any:
        return [dataclasses.asdict(v) for v in value] if self.many else dataclasses.asdict(value)

    def from_json(self, data: Any) -> Any:
        return tuple(self.cls(**item) for item in data) if self.many else self.cls(**data)


class EnumValue(sa.TypeDecorator[Any]):
    """An enum member as its plain text value, so no database-specific enum type is made."""

    impl: type[sa.types.TypeEngine[Any]] = sa.Text
    cache_ok = True

    def __init__(self, enum: type[Enum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else value.value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.enum(value)


class IntEnumValue(EnumValue):
    impl = sa.Integer
    cache_ok = True


class LogEntries(Dataclass):
    """A list rather than Dataclass's tuple: a record's log grows."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(LogEntry, many=True)

    def from_json(self, data: Any) -> Any:
        return list(super().from_json(data))


class Strings(Json):
    """A tuple of strings as a JSON array."""

    cache_ok = True

    def from_json(self, data: Any) -> Any:
        return tuple(data)


metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("app_id", sa.Text, nullable=False),
    sa.Column("request_input", Json, nullable=False),
    sa.Column("base_url", sa.Text, nullable=False),
    sa.Column("params", Dataclass(GenerationParams)),  # NULL when the input failed validation
    sa.Column("loras", Dataclass(LoraRequest, many=True), nullable=False, server_default="[]"),
    sa.Column("image_urls", Strings, nullable=False, server_default="[]"),
    sa.Column("priority", IntEnumValue(Priority), nullable=False),
    sa.Column("start_timeout", sa.Float),
    sa.Column("status", EnumValue(JobStatus), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("inference_seconds", sa.Float),
    sa.Column("logs", LogEntries, nullable=False),
    sa.Column("outcome", Dataclass(Outcome)),
    sa.Column("owner", sa.Text),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_pending", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("jobs_by_finish", "finished_at"),
    sa.Index("jobs_by_status", "status"),  # the unfinished ones, read at every start
    sa.Index("jobs_by_webhook_pending", "webhook_pending"),  # the webhooks still to send, likewise
)

# Every stored file (generated images; uploads next) and who may read it.
files = sa.Table(
    "files",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text),  # digest of the API key of the request that made it (None: keys off)
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("files_by_age", "created_at"),
)

# Initiated uploads waiting for their bytes, by a digest of the secret in their upload URL: in the store,
# so that any ingress replica takes the PUT, and an upload URL survives a restart.
uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("token_digest", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),  # the file it will be stored as (its URL is given out)
    sa.Column("owner", sa.Text),
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
)
