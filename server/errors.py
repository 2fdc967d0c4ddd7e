"""Every failure the HTTP side reports, mapped to fal's answer shapes in one place.

fal has two shapes: model errors, 422 `{"detail": [{"loc", "msg", "type", "input"}]}` (FastAPI's own), and
request errors, `{"detail": "<text>", "error_type": "<category>"}` with an `X-Fal-Error-Type` header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import ValidationError

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


def request_error(status_code: int, detail: str, error_type: str) -> Outcome:
    return Outcome(
        status_code,
        {"detail": detail, "error_type": error_type},
        error=detail,
        error_type=error_type,
        headers={"X-Fal-Error-Type": error_type},
    )


def model_error(errors: list[dict[str, Any]], error_type: str) -> Outcome:
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return Outcome(422, {"detail": errors}, error=summary, error_type=error_type)


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors in exactly the form FastAPI answers a bad body with."""
    errors = [
        {**error, "loc": ("body", *error["loc"]), "input": _printable(error.get("input"))}
        for error in exc.errors(include_url=False)
    ]
    encoded: list[dict[str, Any]] = jsonable_encoder(errors)
    return encoded


def _printable(value: Any) -> Any:
    """Echoed input that is not UTF-8-encodable (lone surrogates) is shown escaped instead of failing."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def invalid_body(exc: ValidationError) -> Outcome:
    return model_error(validation_errors(exc), "validation_error")


def not_json_body(detail: str) -> Outcome:
    return model_error(
        [{"type": "json_invalid", "loc": ["body"], "msg": detail, "input": None}], "validation_error"
    )


def input_error(loc: tuple[str | int, ...], message: str, error_type: str, request_input: Any) -> Outcome:
    """A 422 blaming one input (`loc` below "body"), quoting what the client sent there."""
    value = request_input
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    error = {"type": error_type, "loc": ["body", *loc], "msg": message, "input": value if loc else None}
    return model_error([error], error_type)


_REQUEST_ERRORS: dict[FailureKind, tuple[int, str]] = {
    FailureKind.OUT_OF_MEMORY: (503, "out_of_memory"),
    FailureKind.CANCELLED: (400, "request_cancelled"),
    FailureKind.INTERNAL: (500, "internal_server_error"),
}


def failure_outcome(failure: JobFailed, request_input: dict[str, Any]) -> Outcome:
    if failure.kind is FailureKind.INVALID_INPUT:
        return input_error(failure.loc, failure.message, "value_error", request_input)
    status_code, error_type = _REQUEST_ERRORS[failure.kind]
    return request_error(status_code, failure.message, error_type)


def worker_lost(detail: str) -> Outcome:
    return request_error(503, detail, "runner_disconnected")


class FalHTTPError(Exception):
    """Raised by a route to answer at once with a fal-shaped body."""

    def __init__(self, status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.headers = headers or {}


async def handle_fal_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FalHTTPError)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


def outcome_response(outcome: Outcome, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        outcome.body, status_code=outcome.status_code, headers={**outcome.headers, **(headers or {})}
    )
