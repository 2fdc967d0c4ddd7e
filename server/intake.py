"""Turning an HTTP request into a job record: JSON parsing, validation, priority, a fresh request id."""

from __future__ import annotations

import json
import uuid

from fastapi import Request
from pydantic import ValidationError

from server.auth import request_owner
from server.config import Settings
from server.errors import FalHTTPError, invalid_body, not_json_body
from server.jobs import JobRecord, Priority
from server.outcome import input_error
from server.schemas import APPS
from server.services import Services

_PRIORITIES = {"normal": Priority.NORMAL, "low": Priority.LOW}


def base_url(request: Request, public_url: str | None) -> str:
    """This server's URL as the client sees it (or the configured public URL), with a trailing slash."""
    return (public_url or str(request.base_url)).rstrip("/") + "/"


def queue_limit(request: Request, settings: Settings) -> int:
    """How many may wait before a new request is refused (429): the server's limit, or the client's
    `fal_max_queue_length` when lower."""
    limit = settings.max_queue
    asked = request.query_params.get("fal_max_queue_length")
    if asked is not None:
        if not asked.isdigit():
            raise FalHTTPError(400, {"detail": f"fal_max_queue_length must be a whole number, not {asked!r}"})
        limit = min(limit, int(asked))
    return limit


def _start_timeout(request: Request) -> float | None:
    raw = request.headers.get("x-fal-request-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise FalHTTPError(
            400, {"detail": f"X-Fal-Request-Timeout must be a positive number of seconds: {raw!r}"}
        )
    return seconds


async def new_record(app_id: str, request: Request, services: Services) -> JobRecord:
    """A record for the request; one whose body fails validation is born with its 422 outcome."""
    record = JobRecord(
        request_id=str(uuid.uuid4()),
        app_id=app_id,
        request_input={},
        base_url=base_url(request, services.settings.public_url),
        priority=_PRIORITIES.get(request.headers.get("x-fal-queue-priority", "").lower(), Priority.NORMAL),
        start_timeout=_start_timeout(request),
        owner=request_owner(request),
    )
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        record.outcome = not_json_body(f"the request body is not valid JSON: {exc}")
        return record
    if isinstance(body, dict):
        record.request_input = body
    try:
        validated = APPS[app_id].model_validate(body)
    except ValidationError as exc:
        record.outcome = invalid_body(exc)
        return record
    record.params = validated.to_params()
    record.loras = validated.lora_requests()
    record.image_urls = validated.reference_urls()
    limit = services.settings.max_reference_images
    if len(record.image_urls) > limit:
        record.outcome = input_error(
            ("image_urls",),
            f"at most {limit} reference images are allowed (this server's FLUX2_MAX_REFERENCE_IMAGES)",
            "too_long",
            body,
        )
    record.sync_mode = validated.sync_mode
    return record
