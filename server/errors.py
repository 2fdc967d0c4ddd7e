"""Answering in fal's shapes over HTTP: outcomes as responses, immediate refusals, FastAPI's 422 detail."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.outcome import Outcome, model_error


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
