"""Synchronous runs, the `fal.run` host: `POST /fal-ai/flux-2/lora` answers with the output itself."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.auth import require_key
from server.errors import outcome_response
from server.intake import new_record, refuse_when_busy
from server.jobs import JobRecord
from server.middleware import answer_as
from server.openapi import body_schema, errors
from server.scheduler import Scheduler
from server.schemas import APPS, Flux2Output
from server.services import ServicesDep

router = APIRouter(tags=["sync"], dependencies=[Depends(require_key)])

_DISCONNECT_POLL_SECONDS = 0.5


async def _wait_or_cancel(scheduler: Scheduler, record: JobRecord, request: Request) -> bool:
    """Wait for the outcome; a client that hangs up cancels its request rather than leave GPU work behind."""
    while not record.done:
        await record.wait_for_change(record.version, _DISCONNECT_POLL_SECONDS)
        if not record.done and await request.is_disconnected():
            scheduler.cancel(record.request_id)
            return False
    return True


def _add_route(app_id: str) -> None:
    async def run(request: Request, services: ServicesDep) -> JSONResponse:
        scheduler = services.scheduler
        refuse_when_busy(request, services)
        record = await new_record(app_id, request, services)
        answer_as(request, record.request_id)
        scheduler.accept(record)
        if not await _wait_or_cancel(scheduler, record, request):
            return JSONResponse({"detail": "client disconnected"}, status_code=499)  # nobody reads this
        assert record.outcome is not None
        return outcome_response(record.outcome)

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
