"""Initiated uploads waiting for their bytes (`POST /storage/upload/initiate`, then a `PUT`)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta

TOKEN_LIFETIME = timedelta(hours=1)  # of an upload URL, and of a CDN token


@dataclass(frozen=True)
class PendingUpload:
    name: str  # the file name it will be stored under (its URL was already given out)
    owner: str | None
    content_type: str
    expires: float


@dataclass
class PendingUploads:
    """By the secret in their upload URL, single use. Kept in memory: an upload URL does not survive a
    restart (the client's PUT gets a 404, and it uploads again)."""

    _pending: dict[str, PendingUpload] = field(default_factory=dict)

    def open(self, name: str, owner: str | None, content_type: str) -> str:
        """The secret for a new upload URL."""
        now = time.time()
        self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
        token = secrets.token_urlsafe(24)
        self._pending[token] = PendingUpload(name, owner, content_type, now + TOKEN_LIFETIME.total_seconds())
        return token

    def take(self, token: str) -> PendingUpload | None:
        pending = self._pending.pop(token, None)
        return pending if pending is not None and pending.expires > time.time() else None
