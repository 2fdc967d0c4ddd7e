"""Generated files on disk, served back at `/files/<name>` under unguessable names."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from pipeline.images import CONTENT_TYPES

_EXTENSIONS = {content_type: ext for ext, content_type in CONTENT_TYPES.items()}
_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, content_type: str) -> str:
        """Write the bytes under a fresh random name and return that name."""
        name = f"{secrets.token_hex(16)}.{_EXTENSIONS[content_type]}"
        partial = self.root / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.root / name)  # a reader never sees a half-written file
        return name

    def path(self, name: str) -> Path | None:
        """The file for a served name, or None; names are checked, so no path can leave the root."""
        if not _NAME.match(name):
            return None
        path = self.root / name
        return path if path.is_file() else None

    def delete(self, name: str) -> None:
        path = self.path(name)
        if path is not None:
            path.unlink(missing_ok=True)

    @staticmethod
    def url(base_url: str, name: str) -> str:
        return f"{base_url.rstrip('/')}/files/{name}"
