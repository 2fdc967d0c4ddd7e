"""Synchronous runs, the `fal.run` host: `POST /fal-ai/flux-2/lora` answers with the output itself."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.auth import require_key
from server.desk import Desk
from server.errors import outcome_response
from server.intake import new_record, queue_limit
from server.jobs import JobRecord
from server.middleware import answer_as
from server.openapi import body_schema, errors
from server.outcome import Failure, Outcome, failed
from server.scheduler import NotAccepted
from server.schemas import APPS, Flux2Output
from server.services import ServicesDep

router = APIRouter(tags=["sync"], dependencies=[Depends(require_key)])

_DISCONNECT_POLL_SECONDS = 0.5


async def _outcome(desk: Desk, record: JobRecord, limit: int, request: Request) -> Outcome | None:
    """The request's outcome once done (or its refusal). A client that hangs up cancels its request
    rather than leave GPU work behind (None); one still waiting when the server shuts down is answered
    503."""
    try:
        async for view in desk.run(record, limit, _DISCONNECT_POLL_SECONDS):
            if view.done:
                return view.outcome
            if await request.is_disconnected():
                await desk.cancel(record.request_id)
                return None
    except NotAccepted as refused:
        return refused.outcome
    await desk.cancel(record.request_id)  # unstarted at a shutdown: a sync run is not kept for later
    return failed(Failure.UNAVAILABLE, "The server is shutting down; try again shortly")


def _add_route(app_id: str) -> None:
    async def run(request: Request, services: ServicesDep) -> JSONResponse:
        limit = queue_limit(request, services.settings)
        record = await new_record(app_id, request, services)
        answer_as(request, record.request_id)
        outcome = await _outcome(services.desk, record, limit, request)
        if outcome is None:
            return JSONResponse({"detail": "client disconnected"}, status_code=499)  # nobody reads this
        return outcome_response(outcome)

    router.add_api_route(
        f"/{app_id}",
        run,
        methods=["POST"],
        name=f"run {app_id}",
        summary=f"Run {app_id} and wait for the output",
        response_model=Flux2Output,
        responses=errors(400, 401, 413, 422, 429, 431, 500, 503, 504),
        openapi_extra=body_schema(APPS[app_id]),
    )


for _app_id in APPS:
    _add_route(_app_id)
