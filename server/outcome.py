"""How a finished request answers on its result URL, and every failure's fal answer, in one table.

fal has two shapes: model errors, 422 `{"detail": [{"loc", "msg", "type", "input"}]}` (FastAPI's own), and
request errors, `{"detail": "<text>", "error_type": "<category>"}` with an `X-Fal-Error-Type` header. This
module is plain data: the jobs, the store and the scheduler use it without the web framework;
`server/errors.py` turns an outcome into an HTTP response.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pipeline.messages import FailureKind, JobFailed


@dataclass(frozen=True)
class Outcome:
    """How a finished request answers on its result URL, and what its COMPLETED status says."""

    status_code: int
    body: dict[str, Any]
    error: str | None = None
    error_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status_code == 200


class Failure(StrEnum):
    """Every way an accepted request can fail other than by its input."""

    CANCELLED = "cancelled"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"  # the worker raised something unexpected
    WORKER_LOST = "worker_lost"  # the worker process died with the request in hand
    UNAVAILABLE = "unavailable"  # the model could not be loaded: nothing will run
    START_TIMEOUT = "start_timeout"  # the client's X-Fal-Request-Timeout passed before it started
    RUN_TIMEOUT = "run_timeout"  # it ran longer than the server allows
    NO_SPACE = "no_space"  # the disk (or the job store's) is full: it works again once space returns
    STORAGE = "storage"  # the files or the job store cannot be written for another reason


# status code, fal's error_type, extra headers
_ANSWERS: dict[Failure, tuple[int, str, dict[str, str]]] = {
    Failure.CANCELLED: (400, "request_cancelled", {}),
    Failure.OUT_OF_MEMORY: (503, "out_of_memory", {}),
    Failure.INTERNAL: (500, "internal_server_error", {}),
    Failure.WORKER_LOST: (503, "runner_disconnected", {}),
    Failure.UNAVAILABLE: (503, "runner_scheduling_failure", {}),
    Failure.START_TIMEOUT: (504, "request_timeout", {"X-Fal-Request-Timeout-Type": "user"}),
    Failure.RUN_TIMEOUT: (504, "generation_timeout", {}),
    Failure.NO_SPACE: (507, "insufficient_storage", {}),
    Failure.STORAGE: (503, "storage_unavailable", {}),
}

_SQLITE_FULL = 13  # sqlite3's result code for "database or disk is full"
_POSTGRES_DISK_FULL = "53100"

_FROM_WORKER = {
    FailureKind.CANCELLED: Failure.CANCELLED,
    FailureKind.OUT_OF_MEMORY: Failure.OUT_OF_MEMORY,
    FailureKind.INTERNAL: Failure.INTERNAL,
    FailureKind.WORKER_LOST: Failure.WORKER_LOST,
}


def failed(failure: Failure, detail: str) -> Outcome:
    """fal's request error for `failure`, with `detail` as its text."""
    status_code, error_type, headers = _ANSWERS[failure]
    return Outcome(
        status_code,
        {"detail": detail, "error_type": error_type},
        error=detail,
        error_type=error_type,
        headers={"X-Fal-Error-Type": error_type, **headers},
    )


def model_error(errors: list[dict[str, Any]], error_type: str) -> Outcome:
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return Outcome(422, {"detail": errors}, error=summary, error_type=error_type)


def input_error(loc: tuple[str | int, ...], message: str, error_type: str, request_input: Any) -> Outcome:
    """A 422 blaming one input (`loc` below "body"), quoting what the client sent there."""
    value = request_input
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    error = {
        "type": error_type,
        "loc": ["body", *loc],
        "msg": message,
        "input": _quoted(value) if loc else None,
    }
    return model_error([error], error_type)


_QUOTE_CHARS = 200


def _quoted(value: Any) -> Any:
    """The input as the error quotes it: long strings (a data: URI of megabytes) cut short."""
    if isinstance(value, str) and len(value) > _QUOTE_CHARS:
        return f"{value[:_QUOTE_CHARS]}... ({len(value)} characters)"
    if isinstance(value, list):
        return [_quoted(item) for item in value]
    return value


def worker_failed(failure: JobFailed, request_input: dict[str, Any]) -> Outcome:
    """What the worker's failure message means for the client."""
    if failure.kind is FailureKind.INVALID_INPUT:
        return input_error(failure.loc, failure.message, "value_error", request_input)
    return failed(_FROM_WORKER[failure.kind], failure.message)


def storage_failed(exc: BaseException, what: str) -> Outcome:
    """A write to the disk or to the job store failed: 507 when it is full, 503 otherwise."""
    if _disk_full(exc):
        return failed(Failure.NO_SPACE, f"{what}: the server's disk is full")
    return failed(Failure.STORAGE, f"{what}: {exc}")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = getattr(exc, "orig", None)  # the database driver's own error, under SQLAlchemy's
    return (
        getattr(cause, "sqlite_errorcode", None) == _SQLITE_FULL
        or getattr(cause, "sqlstate", None) == _POSTGRES_DISK_FULL
    )
