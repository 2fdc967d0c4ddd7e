"""Initiated uploads waiting for their bytes (`POST /storage/upload/initiate`, then a `PUT`)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from server.store.database import Database
from server.store.tables import uploads

TOKEN_LIFETIME = timedelta(hours=1)  # of an upload URL, and of a CDN token


@dataclass(frozen=True)
class PendingUpload:
    name: str  # the file name it will be stored under (its URL was already given out)
    owner: str | None
    content_type: str


class PendingUploads:
    """By the secret in their upload URL, single use, kept in the store (only a digest of the secret):
    every ingress replica of a scaled-out server sees them, and a restart keeps them."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def open(self, name: str, owner: str | None, content_type: str) -> str:
        """The secret for a new upload URL."""
        token = secrets.token_urlsafe(24)
        now = time.time()
        row = {
            "token_digest": _digest(token),
            "name": name,
            "owner": owner,
            "content_type": content_type,
            "expires": now + TOKEN_LIFETIME.total_seconds(),
        }

        def add(connection: sa.Connection) -> None:
            connection.execute(sa.delete(uploads).where(uploads.c.expires <= now))
            connection.execute(sa.insert(uploads).values(row))

        self._database.run(add)
        return token

    def take(self, token: str) -> PendingUpload | None:
        taken = (
            sa.delete(uploads)
            .where(uploads.c.token_digest == _digest(token), uploads.c.expires > time.time())
            .returning(uploads.c.name, uploads.c.owner, uploads.c.content_type)
        )
        row = self._database.run(lambda connection: connection.execute(taken).first())
        return None if row is None else PendingUpload(row.name, row.owner, row.content_type)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
