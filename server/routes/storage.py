"""Uploads, the way the fal clients make them, so `fal_client.upload_file` / `upload_image` and JS
`fal.storage.upload` work against this server; every upload lands in the files home with its owner and
the usual retention, and is answered with an absolute `/files/` URL of this server.

- Python (fal_v3, its default): `POST /storage/auth/token` for a CDN token, then `POST /files/upload`
  with the bytes, authorised by that token (here: the caller's own key, handed back).
- JS, and Python's fallback: `POST /storage/upload/initiate` for an upload URL and the file URL, then a
  `PUT` of the bytes to the upload URL, which carries its own single-use token (the JS client sends no
  key there).

Multipart uploads (the clients use them above 90-100 MB) are not offered: they are over the size cap.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.auth import request_owner, require_key
from server.errors import FalHTTPError
from server.files import FileStore
from server.intake import base_url
from server.openapi import errors
from server.outcome import storage_failed
from server.services import Services, ServicesDep
from server.uploads import TOKEN_LIFETIME

router = APIRouter(tags=["storage"])


def _base(request: Request, services: Services) -> str:
    return base_url(request, services.settings.public_url).rstrip("/")


async def _body(request: Request) -> bytes:
    data = await request.body()
    if not data:
        raise FalHTTPError(400, {"detail": "The upload is empty"})
    return data


async def _store(
    services: Services, data: bytes, content_type: str, owner: str | None, name: str | None = None
) -> str:
    try:
        return await services.files.save(data, content_type, owner, name)
    except OSError as exc:  # 507 for a full disk, 503 for any other failure to write
        outcome = storage_failed(exc, "the upload could not be stored")
        raise FalHTTPError(outcome.status_code, outcome.body, outcome.headers) from exc


@router.post(
    "/storage/auth/token",
    summary="A token for uploads (fal_client's CDN token)",
    dependencies=[Depends(require_key)],
    responses=errors(401),
)
async def cdn_token(request: Request, services: ServicesDep) -> JSONResponse:
    # The token the client will send to /files/upload as `<token_type> <token>`: the key it already holds.
    _, _, key = (request.headers.get("authorization") or "").strip().partition(" ")
    return JSONResponse(
        {
            "token": key.strip() or "local",
            "token_type": "Key",
            "base_url": _base(request, services),
            "expires_at": (datetime.now(UTC) + TOKEN_LIFETIME).isoformat(),
        }
    )


@router.post(
    "/files/upload",
    summary="Upload a file (the body); answers its URL",
    dependencies=[Depends(require_key)],
    responses=errors(400, 401, 413, 503, 507),
)
async def upload(request: Request, services: ServicesDep) -> JSONResponse:
    data = await _body(request)
    content_type = request.headers.get("content-type", "application/octet-stream")
    name = await _store(services, data, content_type, request_owner(request))
    return JSONResponse(
        {
            "access_url": FileStore.url(_base(request, services), name),
            "content_type": FileStore.content_type(name),
            "file_name": request.headers.get("x-fal-file-name", name),
            "file_size": len(data),
        }
    )


@router.post(
    "/storage/upload/initiate",
    summary="Start an upload: answers where to PUT the bytes and the file's URL",
    dependencies=[Depends(require_key)],
    responses=errors(400, 401),
)
async def initiate(request: Request, services: ServicesDep) -> JSONResponse:
    try:
        wanted = await request.json()
        content_type = str(wanted.get("content_type") or "application/octet-stream")
    except (ValueError, AttributeError):
        raise FalHTTPError(400, {"detail": "Expected a JSON body with `content_type`"}) from None
    name = FileStore.new_name(content_type)
    token = services.uploads.open(name, request_owner(request), content_type)
    base = _base(request, services)
    return JSONResponse(
        {"upload_url": f"{base}/storage/upload/{token}", "file_url": FileStore.url(base, name)}
    )


@router.put(
    "/storage/upload/{token}",
    summary="The bytes of an initiated upload (the URL is the authority: no key needed)",
    responses=errors(400, 404, 413, 503, 507),
)
async def put_upload(request: Request, services: ServicesDep, token: str) -> JSONResponse:
    data = await _body(request)
    pending = services.uploads.take(token)
    if pending is None:
        raise FalHTTPError(404, {"detail": "Unknown or expired upload URL"})
    await _store(services, data, pending.content_type, pending.owner, pending.name)
    return JSONResponse({"file_size": len(data)})
