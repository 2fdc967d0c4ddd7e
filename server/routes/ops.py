"""Operations: liveness, readiness, and the generated files."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.auth import request_owner, require_key
from server.errors import FalHTTPError
from server.files import FileStore
from server.openapi import errors
from server.scheduler import Scheduler, WorkerState
from server.schemas import ReadyBody

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the HTTP side answers (the worker may still be loading)")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: 200 once the model is loaded, 503 before or after a failure",
    response_model=ReadyBody,
    responses={503: {"model": ReadyBody, "description": "Not ready"}},
)
async def ready(request: Request) -> JSONResponse:
    scheduler: Scheduler = request.app.state.scheduler
    info = scheduler.ready_info
    body = {
        "ready": scheduler.state is WorkerState.READY,
        "state": scheduler.state.value,
        "model": info.model if info else request.app.state.model_name,
        "device": info.device if info else None,
        "dtype": info.dtype if info else None,
        "compiled": info.compiled if info else None,
        "attention_backend": info.attention_backend if info else None,
        "memory_profile": info.memory_profile if info else None,
        "queue_depth": scheduler.queue_depth,
        "worker_restarts": scheduler.restarts,
        "error": scheduler.failure,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get(
    "/.well-known/jwks.json",
    summary="The public key that signs webhooks (JWKS)",
    response_model=dict[str, list[dict[str, str]]],
)
async def jwks(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.webhooks.signer.jwks())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/files/{name}",
    summary="A generated image",
    dependencies=[Depends(require_key)],
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **errors(401, 404)},
)
async def file(request: Request, name: str) -> FileResponse:
    files: FileStore = request.app.state.files
    scheduler: Scheduler = request.app.state.scheduler
    path = files.path(name)
    if path is None or scheduler.file_owners.get(name) != request_owner(request):
        raise FalHTTPError(404, {"detail": "File not found"})
    return FileResponse(path)
