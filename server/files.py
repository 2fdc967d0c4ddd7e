"""The one home of stored files: generated images, uploads, and requests' reference images.

Each file is written under an unguessable name in the files folder, with its owner (the API key digest
of the request that made it) in the store's `files` table; it is served only to that owner and deleted
when the retention time has passed. Disk writes happen in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from pathlib import Path

import sqlalchemy as sa

from server.store.database import Database
from server.store.tables import files

# What a stored file may be served as, by extension. Uploads of any other type are kept as `.bin` and
# served as octet-stream: nothing stored is ever served as HTML or script from this server's origin.
CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "avif": "image/avif",
    "heic": "image/heic",
    "ppm": "image/x-portable-pixmap",  # a request's decoded reference images
    "bin": "application/octet-stream",
}
_EXTENSIONS = {content_type: ext for ext, content_type in CONTENT_TYPES.items()} | {"image/jpg": "jpeg"}
_NAME = re.compile(rf"^[0-9a-f]{{32}}\.({'|'.join(CONTENT_TYPES)})$")


class FileStore:
    def __init__(self, root: Path, database: Database) -> None:
        self.root = root
        self._database = database
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_name(content_type: str) -> str:
        """A fresh unguessable name whose extension says how the file will be served."""
        media_type = content_type.split(";")[0].strip().lower()
        return f"{secrets.token_hex(16)}.{_EXTENSIONS.get(media_type, 'bin')}"

    async def save(self, data: bytes, content_type: str, owner: str | None, name: str | None = None) -> str:
        """Store the bytes, readable by `owner`, under `name` (from `new_name`) or a fresh one; returns
        the name."""
        name = name or self.new_name(content_type)
        await asyncio.to_thread(self._save, name, data, owner)
        return name

    def _save(self, name: str, data: bytes, owner: str | None) -> None:
        # The row first: a file that fails to be written leaves only a row, which expires like any other.
        row = files.insert().values(name=name, owner=owner, created_at=time.time())
        self._database.run(lambda connection: connection.execute(row))
        partial = self.root / f".{name}.partial"
        try:
            partial.write_bytes(data)
            os.replace(partial, self.root / name)  # a reader never sees a half-written file
        finally:
            partial.unlink(missing_ok=True)  # a full disk leaves no partial file behind

    def path_for(self, name: str, owner: str | None) -> Path | None:
        """The file to serve for `name` to `owner`, or None: unknown, gone, or someone else's (never told
        apart, so no one learns that another key's file exists). Names are checked, so no path can leave
        the folder."""
        if not _NAME.match(name):
            return None
        query = sa.select(files.c.owner).where(files.c.name == name)
        row = self._database.run(lambda connection: connection.execute(query).first())
        path = self.root / name
        return path if row is not None and row.owner == owner and path.is_file() else None

    def delete(self, names: list[str]) -> None:
        """Delete these files now (a request's reference images, once it is done with them)."""
        for name in names:
            with contextlib.suppress(OSError):
                (self.root / name).unlink(missing_ok=True)
        self._database.run(
            lambda connection: connection.execute(sa.delete(files).where(files.c.name.in_(names)))
        )

    def expire(self, cutoff: float) -> int:
        """Delete the files stored before `cutoff` (a time.time() value); returns how many."""
        old = files.c.created_at < cutoff

        def expire(connection: sa.Connection) -> list[str]:
            names = list(connection.execute(sa.select(files.c.name).where(old)).scalars())
            for name in names:
                with contextlib.suppress(OSError):
                    (self.root / name).unlink(missing_ok=True)
            connection.execute(sa.delete(files).where(old))
            return names

        return len(self._database.run(expire))

    @staticmethod
    def url(base_url: str, name: str) -> str:
        return f"{base_url.rstrip('/')}/files/{name}"

    @staticmethod
    def content_type(name: str) -> str:
        return CONTENT_TYPES[name.rsplit(".", 1)[1]]
