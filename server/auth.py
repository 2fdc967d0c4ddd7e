"""Optional API keys, fal style: `Authorization: Key <key>` (or `Bearer <key>`).

Keys are held only as SHA-256 digests and compared in constant time. A request's owner is a short digest
of the key that submitted it, so one key can never see, stream, fetch or cancel another key's requests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from server.errors import FalHTTPError
from server.services import ServicesDep

OWNER_STATE = "fal_owner"
_SCHEMES = ("key", "bearer")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys if key]

    @classmethod
    def from_settings(cls, keys: tuple[str, ...], keys_file: Path | None) -> KeyRing:
        from_file = keys_file.read_text(encoding="utf-8").split() if keys_file else []
        return cls([*keys, *from_file])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id for a valid Authorization header, else None."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() not in _SCHEMES or not token.strip():
            return None
        digest = _digest(token.strip())
        matched = False
        for known in self._digests:  # no early exit: the time taken does not say which key matched
            matched |= hmac.compare_digest(digest, known)
        return digest.hex()[:32] if matched else None


async def require_key(request: Request, services: ServicesDep) -> None:
    """Route dependency: with keys configured, a valid key is required and becomes the request's owner."""
    keys = services.keys
    if not keys.enabled:
        return
    owner = keys.owner(request.headers.get("authorization"))
    if owner is None:
        raise FalHTTPError(
            401,
            {"detail": "Missing or invalid API key: send `Authorization: Key <key>`"},
            {"WWW-Authenticate": "Key"},
        )
    setattr(request.state, OWNER_STATE, owner)


def request_owner(request: Request) -> str | None:
    owner: str | None = getattr(request.state, OWNER_STATE, None)
    return owner
