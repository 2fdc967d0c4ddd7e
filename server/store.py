"""The durable job store: every accepted queue request, so none is lost across a crash or restart.

SQLite in WAL mode in the data folder: a committed write survives the process being killed (`kill -9`);
only a power loss may lose the last transactions (synchronous=NORMAL). Records are written when they are
accepted, start and complete; step logs between those points live in memory only. The scheduler sees the
store through `JobStore`, so a shared store (Postgres, Redis) can replace SQLite when several machines
serve one queue.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from pipeline.messages import GenerationParams
from server.fetch.lora_fetcher import LoraRequest
from server.jobs import JobRecord, JobStatus, LogEntry, Priority
from server.outcome import Outcome


class JobStore(Protocol):
    def save(self, record: JobRecord) -> None: ...
    def load_all(self) -> list[JobRecord]: ...
    def delete_finished_before(self, cutoff: float) -> list[str]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    request_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    request_input TEXT NOT NULL,
    base_url TEXT NOT NULL,
    params TEXT,
    priority INTEGER NOT NULL,
    start_timeout REAL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    inference_seconds REAL,
    logs TEXT NOT NULL,
    outcome TEXT,
    owner TEXT,
    webhook_url TEXT,
    webhook_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at);
"""

_COLUMNS = (
    "request_id, app_id, request_input, base_url, params, priority, start_timeout, status, created_at,"
    " started_at, finished_at, inference_seconds, logs, outcome, owner, webhook_url, webhook_pending"
)
_ADDED_COLUMNS = {"webhook_pending": "INTEGER NOT NULL DEFAULT 0"}  # for stores made by older versions
_INSERT = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})"


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used only from the event loop's thread: each write is a short transaction.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")

    def save(self, record: JobRecord) -> None:
        self._db.execute(_INSERT, _row(record))

    def load_all(self) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def delete_finished_before(self, cutoff: float) -> list[str]:
        """Forget requests that completed before `cutoff`; returns their ids."""
        rows = self._db.execute("SELECT request_id FROM jobs WHERE finished_at < ?", (cutoff,)).fetchall()
        self._db.execute("DELETE FROM jobs WHERE finished_at < ?", (cutoff,))
        return [row[0] for row in rows]

    def close(self) -> None:
        self._db.close()


def _row(record: JobRecord) -> tuple[Any, ...]:
    outcome = record.outcome
    return (
        record.request_id,
        record.app_id,
        json.dumps(record.request_input),
        record.base_url,
        _params_json(record),
        int(record.priority),
        record.start_timeout,
        record.status.value,
        record.created_at,
        record.started_at,
        record.finished_at,
        record.inference_seconds,
        json.dumps([entry.to_json() for entry in record.logs]),
        json.dumps(dataclasses.asdict(outcome)) if outcome else None,
        record.owner,
        record.webhook_url,
        int(record.webhook_pending),
    )


def _record(row: tuple[Any, ...]) -> JobRecord:
    (request_id, app_id, request_input, base_url, params, priority, start_timeout, status, created_at,
     started_at, finished_at, inference_seconds, logs, outcome, owner, webhook_url,
     webhook_pending) = row  # fmt: skip
    record = JobRecord(
        request_id=request_id,
        app_id=app_id,
        request_input=json.loads(request_input),
        base_url=base_url,
        params=_params(json.loads(params)) if params else None,
        loras=_loras(json.loads(params)) if params else (),
        priority=Priority(priority),
        status=JobStatus(status),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        inference_seconds=inference_seconds,
        logs=[LogEntry(**entry) for entry in json.loads(logs)],
        outcome=Outcome(**json.loads(outcome)) if outcome else None,
        start_timeout=start_timeout,
        owner=owner,
        webhook_url=webhook_url,
        webhook_pending=bool(webhook_pending),
        durable=True,
    )
    record.sync_mode = bool(record.request_input.get("sync_mode", False))
    return record


def _params_json(record: JobRecord) -> str | None:
    """The generation parameters with the requested LoRAs, as one JSON object."""
    if record.params is None:
        return None
    loras = [dataclasses.asdict(lora) for lora in record.loras]
    return json.dumps({**dataclasses.asdict(record.params), "loras": loras})


def _params(data: dict[str, Any]) -> GenerationParams:
    return GenerationParams(**{key: value for key, value in data.items() if key != "loras"})


def _loras(data: dict[str, Any]) -> tuple[LoraRequest, ...]:
    # Stores written by older versions also kept the fetched file of each LoRA: it is fetched anew.
    return tuple(LoraRequest(lora["path"], lora["scale"]) for lora in data["loras"])
