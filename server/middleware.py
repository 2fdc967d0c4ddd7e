"""ASGI middleware that makes every path look the way fal clients expect.

- `ANY /api/fal/proxy` (the JS client's proxy mode) is re-dispatched in place to the route named by the
  `x-fal-target-url` header: `fal.run` maps to `/`, `queue.fal.run` to `/queue/`, `rest.fal.ai` (the
  storage calls of `fal.storage.upload`) to `/`.
- A trailing slash is accepted on every route (fal's own SDK adds them).
- Every response carries `x-fal-request-id`: the request's id where a route set one, a fresh id otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
TARGET_HEADER = b"x-fal-target-url"
_HOST_PREFIXES = {"fal.run": "", "queue.fal.run": "/queue", "rest.fal.ai": ""}  # rest: uploads
_REQUEST_ID_STATE = "fal_request_id"


def answer_as(request: Request, request_id: str) -> None:
    """The `x-fal-request-id` this request's response will carry (a route sets it once it knows the id)."""
    setattr(request.state, _REQUEST_ID_STATE, request_id)


class FalRoutingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = dict(scope)
        state: dict[str, Any] = dict(scope.get("state") or {})
        scope["state"] = state
        path: str = scope["path"]
        if path.rstrip("/") == PROXY_PATH:
            error = _retarget(scope)
            if error is not None:
                await _answer(send, 400, {"detail": error}, str(uuid.uuid4()))
                return
            path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope["path"] = path.rstrip("/") or "/"
            scope["raw_path"] = scope["path"].encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                request_id = state.get(_REQUEST_ID_STATE) or str(uuid.uuid4())
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-fal-request-id"]
                message = {**message, "headers": [*headers, (b"x-fal-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class SizeLimitMiddleware:
    """431 for oversized headers; 413 for a body over the path's cap (`max_bytes`, unless `path_cap` has
    one for the path: edits carry reference images, uploads whole files), declared or counted as it
    streams in."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_header_bytes: int,
        path_cap: Callable[[str], int | None] = lambda path: None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.path_cap = path_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        header_bytes += sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            detail = {"detail": f"Request headers larger than {self.max_header_bytes} bytes"}
            await _answer(send, 431, detail, str(uuid.uuid4()))
            return
        cap = self.path_cap(scope["path"])
        max_bytes = self.max_bytes if cap is None else cap
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        too_large = {"detail": f"Request body larger than {max_bytes} bytes"}
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await _answer(send, 413, too_large, str(uuid.uuid4()))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await _answer(send, 413, too_large, str(uuid.uuid4()))


class _BodyTooLarge(Exception):
    pass


def _retarget(scope: dict[str, Any]) -> str | None:
    """Point the scope at the URL the proxied client meant to call; an error message if we cannot."""
    target = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == TARGET_HEADER), None)
    if not target:
        return "missing the x-fal-target-url header"
    parts = urlsplit(target)
    if parts.hostname not in _HOST_PREFIXES:
        return f"x-fal-target-url must point at fal.run, queue.fal.run or rest.fal.ai, not {parts.hostname!r}"
    scope["path"] = _HOST_PREFIXES[parts.hostname] + (parts.path or "/")
    scope["raw_path"] = scope["path"].encode()
    scope["query_string"] = parts.query.encode()
    return None


async def _answer(send: Send, status: int, body: dict[str, Any], request_id: str) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"x-fal-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
