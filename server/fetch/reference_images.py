"""A request's reference images (`image_urls`) onto local disk, ready for the worker.

Each entry is one of three things:

1. This server's own file URL (`<base>/files/<name>`: an upload or a generated image), read from disk, not
   over HTTP, and only when it belongs to the caller's API key.
2. A `data:` URI (what `fal_client.encode_image` makes), base64 or percent-encoded.
3. An `http://` / `https://` URL, downloaded like a LoRA: public addresses only, pinned, redirects
   re-checked, with the same deadline, minimum rate and turns.

The bytes are decoded and scaled down (`image_decode`) in a worker thread, a few at once, and stored as
raw RGB (PPM) in the files home, owned by the request's key, until the request is done with them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from server.fetch.downloads import Downloader
from server.fetch.errors import FetchFailure, human_bytes
from server.fetch.image_decode import ImageProblem, decode_reference, encode_raw
from server.fetch.tasks import cancel_and_collect
from server.files import FileStore

_DATA_URI = re.compile(r"^data:(?P<type>[^,;]*)(?P<params>(;[^,;]*)*?)(?P<base64>;base64)?,", re.IGNORECASE)
_DECODES_AT_ONCE = 2  # a decoded 64-megapixel RGBA image takes 256 MiB: bound what decoding may hold


@dataclass(frozen=True)
class ReferencePolicy:
    max_bytes: int = 25 * 1024**2  # one image as sent (downloaded, uploaded or in a data: URI)
    max_pixels: int = 64_000_000  # one image decoded


class ReferenceImageError(Exception):
    """Entry `index` of `image_urls` cannot be used; the message is for the client."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


class ReferenceFetcher:
    def __init__(self, policy: ReferencePolicy, downloads: Downloader, files: FileStore) -> None:
        self.policy = policy
        self.downloads = downloads
        self.files = files
        self._decoding = asyncio.Semaphore(_DECODES_AT_ONCE)

    async def fetch_all(self, urls: Sequence[str], owner: str | None, own_bases: Sequence[str]) -> list[Path]:
        """Every entry fetched, checked and stored, concurrently; the first failure cancels the rest (and
        drops what was stored) and is raised. `own_bases` are the URLs this server is known by."""
        tasks = [asyncio.create_task(self._one(i, url, owner, own_bases)) for i, url in enumerate(urls)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            await self.release(await cancel_and_collect(tasks))
            raise

    async def release(self, stored: Sequence[Path]) -> None:
        """The request is done with its references: their files go."""
        if stored:
            await asyncio.to_thread(self.files.delete, [path.name for path in stored])

    async def _one(self, index: int, url: str, owner: str | None, own_bases: Sequence[str]) -> Path:
        try:
            data = await self._read(url, owner, own_bases)
            async with self._decoding:
                pixels = await asyncio.to_thread(_normalized, data, self.policy.max_pixels)
        except (FetchFailure, ImageProblem) as exc:
            raise ReferenceImageError(index, f"image {index}: {exc}") from None
        name = await self.files.save(pixels, "image/x-portable-pixmap", owner)
        return self.files.root / name

    async def _read(self, url: str, owner: str | None, own_bases: Sequence[str]) -> bytes:
        if url[:5].lower() == "data:":
            return _data_uri_bytes(url, self.policy.max_bytes)
        own = _own_file_name(url, own_bases)
        if own is not None:
            path = self.files.path_for(own, owner)
            if path is None:  # unknown, expired, or another key's: never told apart
                raise FetchFailure("this server has no such file (or it has expired)")
            return await asyncio.to_thread(path.read_bytes)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchFailure(
                "must be an https:// or http:// URL, a data: URI, or a file URL of this server"
            )
        return await self.downloads.read(url, self.policy.max_bytes)


def _normalized(data: bytes, max_pixels: int) -> bytes:
    return encode_raw(decode_reference(data, max_pixels))


def _own_file_name(url: str, own_bases: Sequence[str]) -> str | None:
    """The file name when `url` is a file URL of this server (`<base>files/<name>`), else None."""
    for base in own_bases:
        prefix = base.rstrip("/") + "/files/"
        if url.startswith(prefix):
            name = url[len(prefix) :].split("?", 1)[0]
            return name or None
    return None


def _data_uri_bytes(uri: str, max_bytes: int) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None:
        raise FetchFailure("a malformed data: URI (expected data:<type>;base64,<data>)")
    payload = uri[match.end() :]
    if not match["base64"]:
        data = unquote_to_bytes(payload)
    else:
        if len(payload) * 3 // 4 > max_bytes + 2:  # before decoding anything
            raise FetchFailure(f"the data: URI holds more than the {human_bytes(max_bytes)} limit")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise FetchFailure("the data: URI's base64 is invalid") from None
    if len(data) > max_bytes:
        raise FetchFailure(
            f"the data: URI holds {human_bytes(len(data))}, over the {human_bytes(max_bytes)} limit"
        )
    if not data:
        raise FetchFailure("the data: URI is empty")
    return data
