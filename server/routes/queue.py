"""The queue, the `queue.fal.run` host, under `/queue/`: submit, status, status stream, result, cancel.

Submit uses the full app id (`fal-ai/flux-2/lora`); the other routes use only `owner/alias`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import request_owner, require_key
from server.desk import Desk, RequestView
from server.errors import FalHTTPError, outcome_response
from server.intake import new_record, queue_limit
from server.jobs import JobStatus
from server.middleware import answer_as
from server.openapi import body_schema, errors
from server.scheduler import CancelResult, NotAccepted
from server.schemas import APPS, CancelBody, Flux2Output, QueueStatusBody
from server.services import Services, ServicesDep

router = APIRouter(prefix="/queue", tags=["queue"], dependencies=[Depends(require_key)])

_TRUE = {"1", "true", "yes", "on"}
_REQUEST = "/{owner}/{alias}/requests/{request_id}"
_STREAM_TICK_SECONDS = 1.0


def _urls(view: RequestView) -> dict[str, str]:
    owner, alias = view.app_id.split("/")[:2]
    base = f"{view.base_url}queue/{owner}/{alias}/requests/{view.request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


async def _find(request: Request, desk: Desk, owner: str, alias: str, request_id: str) -> RequestView:
    """The request, or a 404; the app in the URL must be the one the request was submitted to."""
    answer_as(request, request_id)
    view = await _visible(request, desk, owner, alias, request_id)
    if view is None:
        raise FalHTTPError(404, {"detail": f"Request {request_id!r} not found"})
    return view


async def _visible(
    request: Request, desk: Desk, owner: str, alias: str, request_id: str
) -> RequestView | None:
    """The request if it exists for this app and belongs to the caller's key (404 otherwise: never 403,
    which would confirm that someone else's request id exists)."""
    view = await desk.find(request_id)
    if view is None or view.app_id.split("/")[:2] != [owner, alias] or view.owner != request_owner(request):
        return None
    return view


def status_body(view: RequestView, with_logs: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": view.status.value,
        "request_id": view.request_id,
        **_urls(view),
        "queue_position": view.queue_position,
        "logs": [entry.to_json() for entry in view.logs] if with_logs else None,
    }
    if view.done:
        assert view.outcome is not None
        seconds = view.inference_seconds
        body["metrics"] = {"inference_time": seconds} if seconds is not None else {}
        if not view.outcome.ok:
            body["error"] = view.outcome.error
            body["error_type"] = view.outcome.error_type
    return body


def _wants_logs(request: Request) -> bool:
    return request.query_params.get("logs", "0").lower() in _TRUE


async def _webhook(request: Request, services: Services) -> str | None:
    """The `?fal_webhook=` URL, refused (400) when it points at a forbidden address, as LoRA URLs are."""
    url = request.query_params.get("fal_webhook")
    if not url:
        return None
    refusal = await services.webhooks.check_url_async(url)
    if refusal is not None:
        raise FalHTTPError(400, {"detail": f"fal_webhook refused: {refusal}"})
    return url


def _add_submit_route(app_id: str) -> None:
    async def submit(request: Request, services: ServicesDep) -> JSONResponse:
        limit = queue_limit(request, services.settings)
        record = await new_record(app_id, request, services)
        record.durable = True  # kept in the job store: it must survive a restart
        record.webhook_url = await _webhook(request, services)
        try:
            view = await services.desk.accept(record, limit)
        except NotAccepted as refused:
            return outcome_response(refused.outcome)
        answer_as(request, record.request_id)
        body = {**status_body(view, with_logs=False), "status": JobStatus.IN_QUEUE.value}
        body["queue_position"] = body["queue_position"] or 0
        return JSONResponse(body)

    router.add_api_route(
        f"/{app_id}",
        submit,
        methods=["POST"],
        name=f"submit {app_id}",
        summary=f"Queue a request for {app_id}; validation errors surface on the result URL",
        response_model=QueueStatusBody,
        responses=errors(400, 401, 413, 429, 431),
        openapi_extra=body_schema(APPS[app_id]),
    )


for _app_id in APPS:
    _add_submit_route(_app_id)


@router.get(
    _REQUEST + "/status",
    summary="A request's status: 202 until COMPLETED, then 200",
    response_model=QueueStatusBody,
    responses={202: {"model": QueueStatusBody, "description": "Not completed yet"}, **errors(401, 404)},
)
async def status(
    request: Request, services: ServicesDep, owner: str, alias: str, request_id: str
) -> JSONResponse:
    view = await _find(request, services.desk, owner, alias, request_id)
    body = status_body(view, _wants_logs(request))
    return JSONResponse(body, status_code=200 if view.done else 202)


@router.get(
    _REQUEST + "/status/stream",
    summary="Status as Server-Sent Events, closing after COMPLETED",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **errors(401, 404)},
)
async def status_stream(
    request: Request, services: ServicesDep, owner: str, alias: str, request_id: str
) -> StreamingResponse:
    desk, with_logs = services.desk, _wants_logs(request)
    await _find(request, desk, owner, alias, request_id)
    ping_seconds = services.settings.sse_ping_seconds

    async def events() -> AsyncIterator[str]:
        # Each event carries only the log entries not sent before: the JS client appends them to a list.
        last_state: dict[str, Any] | None = None
        logs_sent = 0
        last_write = time.monotonic()
        # A view at any change, and at least every tick for queue positions and pings.
        async for view in desk.watch(request_id, min(_STREAM_TICK_SECONDS, ping_seconds)):
            state = status_body(view, with_logs=False)
            new_logs = view.logs[logs_sent:] if with_logs else ()
            if state != last_state or new_logs:
                event = {**state, "logs": [entry.to_json() for entry in new_logs] if with_logs else None}
                yield f"data: {json.dumps(event)}\n\n"
                last_state, logs_sent, last_write = state, logs_sent + len(new_logs), time.monotonic()
            elif time.monotonic() - last_write >= ping_seconds:
                yield ": ping\n\n"
                last_write = time.monotonic()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.get(
    _REQUEST,
    summary="The output (or the model's error) of a completed request",
    response_model=Flux2Output,
    responses=errors(400, 401, 404, 422, 500, 503, 504),
)
async def result(
    request: Request, services: ServicesDep, owner: str, alias: str, request_id: str
) -> JSONResponse:
    view = await _find(request, services.desk, owner, alias, request_id)
    if not view.done:
        raise FalHTTPError(400, {"detail": "Request is still in progress"})
    assert view.outcome is not None
    return outcome_response(view.outcome)


_CANCEL_CODES = {
    CancelResult.REQUESTED: 202,
    CancelResult.ALREADY_COMPLETED: 400,
    CancelResult.NOT_FOUND: 404,
}


@router.put(
    _REQUEST + "/cancel",
    summary="Cancel a request: 202, or 400 when already completed",
    status_code=202,
    response_model=CancelBody,
    responses={
        400: {"model": CancelBody, "description": "Already completed"},
        404: {"model": CancelBody, "description": "Not found"},
        **errors(401),
    },
)
async def cancel(
    request: Request, services: ServicesDep, owner: str, alias: str, request_id: str
) -> JSONResponse:
    answer_as(request, request_id)
    if await _visible(request, services.desk, owner, alias, request_id) is None:
        return JSONResponse({"status": CancelResult.NOT_FOUND.value}, status_code=404)
    outcome = await services.desk.cancel(request_id)
    return JSONResponse({"status": outcome.value}, status_code=_CANCEL_CODES[outcome])
