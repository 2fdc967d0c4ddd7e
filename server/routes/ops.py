"""Operations: liveness, readiness, and the generated files."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import request_owner, require_key
from server.errors import FalHTTPError
from server.openapi import errors
from server.schemas import ReadyBody
from server.services import ServicesDep

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
async def ready(services: ServicesDep) -> JSONResponse:
    body = await services.desk.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get(
    "/.well-known/jwks.json",
    summary="The public key that signs webhooks (JWKS)",
    response_model=dict[str, list[dict[str, str]]],
)
async def jwks(services: ServicesDep) -> JSONResponse:
    return JSONResponse(services.webhooks.signer.jwks())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(await services.desk.metrics(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/files/{name}",
    summary="A generated image or an upload (its owner's only, under API keys)",
    dependencies=[Depends(require_key)],
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **errors(401, 404)},
)
async def file(request: Request, services: ServicesDep, name: str) -> FileResponse:
    path = services.files.path_for(name, request_owner(request))
    if path is None:
        raise FalHTTPError(404, {"detail": "File not found"})
    return FileResponse(
        path, media_type=services.files.content_type(name), headers={"X-Content-Type-Options": "nosniff"}
    )
