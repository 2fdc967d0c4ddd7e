"""LoRA files over HTTP(S), into the disk cache.

Connections go only to public addresses, pinned to the address that was checked (`address_guard`);
redirects are followed by hand (at most 5), each hop through the same check. A download is streamed to a
partial file, hashed on the way, size-capped as it arrives, and checked as safetensors before it enters
the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from server.fetch.address_guard import ForbiddenAddress, GuardedTransport
from server.fetch.disk_cache import DiskCache
from server.fetch.errors import FetchFailure, human_bytes
from server.fetch.safetensors_check import CheckedFile, validate_safetensors

MAX_REDIRECTS = 5
_CHUNK = 1024 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int
    allow_private_addresses: bool = False
    connect_timeout: float = 10
    read_timeout: float = 60


@dataclass
class Progress:
    """What a running download has learnt, told to whoever shares it (the request budgets)."""

    announced: Callable[[int], None] = lambda length: None  # the server's Content-Length
    streamed: Callable[[int], None] = lambda total: None  # bytes received so far


class Downloader:
    def __init__(self, policy: DownloadPolicy, cache: DiskCache) -> None:
        self.policy = policy
        self.cache = cache
        self._client: httpx.AsyncClient | None = None

    async def download(self, url: str, progress: Progress) -> CheckedFile:
        """The URL's file in the cache: the one fetched before, or a new download."""
        cached = self.cache.lookup(url)
        if cached is not None:
            return cached
        p = self.policy
        try:
            current = httpx.URL(url)
            for _hop in range(MAX_REDIRECTS + 1):
                async with self._http().stream("GET", current) as resp:
                    if resp.status_code in _REDIRECT_CODES:
                        location = resp.headers.get("location")
                        if not location:
                            raise FetchFailure(f"the server answered {resp.status_code} without a Location")
                        current = current.join(location)
                        if current.scheme not in ("http", "https"):
                            raise FetchFailure(f"redirected to a non-http URL ({current.scheme}:)")
                        continue
                    if resp.status_code != 200:
                        raise FetchFailure(f"the server answered {resp.status_code}")
                    return await self._stream_to_cache(url, resp, progress)
            raise FetchFailure(f"too many redirects (more than {MAX_REDIRECTS})")
        except ForbiddenAddress as exc:
            raise FetchFailure(
                f"{exc.host} resolves to the non-public address {exc.address}, which is not allowed"
            ) from None
        except httpx.ConnectTimeout:
            raise FetchFailure(f"could not connect within {p.connect_timeout:g} s") from None
        except httpx.ReadTimeout:
            raise FetchFailure(f"the server sent nothing for {p.read_timeout:g} s (read timeout)") from None
        except httpx.TimeoutException:
            raise FetchFailure("the download timed out") from None
        except httpx.ConnectError as exc:
            raise FetchFailure(f"could not connect: {exc}") from None
        except httpx.RemoteProtocolError:
            raise FetchFailure("the connection closed before the whole file arrived") from None
        except httpx.HTTPError as exc:
            raise FetchFailure(f"the download failed: {exc}") from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            p = self.policy
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(p.allow_private_addresses),
                timeout=httpx.Timeout(
                    connect=p.connect_timeout,
                    read=p.read_timeout,
                    write=p.read_timeout,
                    pool=p.connect_timeout,
                ),
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._client

    async def _stream_to_cache(self, url: str, resp: httpx.Response, progress: Progress) -> CheckedFile:
        limit = self.policy.max_bytes
        length_header = resp.headers.get("content-length")
        if length_header is not None and length_header.isdigit():
            length = int(length_header)
            if length > limit:
                raise FetchFailure(f"the file is {human_bytes(length)}, over the {human_bytes(limit)} limit")
            progress.announced(length)
        partial = self.cache.partial_file()
        hasher = hashlib.sha256()
        total = 0
        try:
            with partial.open("wb") as out:
                async for chunk in resp.aiter_raw(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise FetchFailure(f"the file is larger than the {human_bytes(limit)} limit")
                    progress.streamed(total)
                    hasher.update(chunk)
                    out.write(chunk)
            validate_safetensors(partial)
            return self.cache.add(url, partial, hasher.hexdigest(), total, resp.headers.get("etag"))
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
