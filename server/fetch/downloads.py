"""Files over HTTP(S): LoRAs into the disk cache, reference images into memory.

Connections go only to public addresses, pinned to the address that was checked (`address_guard`);
redirects are followed by hand (at most 5), each hop through the same check. A download is size-capped as
it arrives; a LoRA is streamed to a partial file, hashed on the way, and checked as safetensors before
it enters the cache. Every download has to keep moving (a minimum rate over each window, a read timeout)
and to end (a total deadline), and only so many run at once, in all and per host: more wait their turn,
so a flood of slow URLs holds neither the process nor the other requests' downloads for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from server.fetch.address_guard import ForbiddenAddress, GuardedTransport
from server.fetch.disk_cache import DiskCache
from server.fetch.errors import FetchFailure, human_bytes
from server.fetch.safetensors_check import CheckedFile, validate_safetensors

MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

T = TypeVar("T")


@dataclass(frozen=True)
class TransferLimits:
    connect_timeout: float = 10
    read_timeout: float = 30  # nothing received for this long ends the download
    deadline: float = 1800  # the whole download, redirects included, from when its turn comes
    min_rate: int = 32 * 1024  # bytes per second, over each `rate_window`
    rate_window: float = 30
    max_concurrent: int = 16  # downloads at once
    max_per_host: int = 4  # downloads at once from one host


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int
    allow_private_addresses: bool = False
    limits: TransferLimits = field(default_factory=TransferLimits)


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
        self._turns = _Turns(policy.limits.max_concurrent, policy.limits.max_per_host)

    async def download(self, url: str, progress: Progress) -> CheckedFile:
        """The URL's LoRA file in the cache: the one fetched before, or a new download once its turn
        comes."""
        cached = self.cache.lookup(url)
        if cached is not None:
            return cached

        async def into_cache(resp: httpx.Response) -> CheckedFile:
            return await self._stream_to_cache(url, resp, progress)

        return await self._fetch(url, into_cache)

    async def read(self, url: str, max_bytes: int) -> bytes:
        """The URL's body in memory (a reference image), at most `max_bytes`; with the same turns, limits
        and address rules as LoRA downloads."""

        async def into_memory(resp: httpx.Response) -> bytes:
            _check_announced(resp, max_bytes, Progress())
            return b"".join([chunk async for chunk in _chunks(resp, max_bytes, self.policy.limits)])

        return await self._fetch(url, into_memory)

    async def _fetch(self, url: str, consume: Callable[[httpx.Response], Awaitable[T]]) -> T:
        deadline = self.policy.limits.deadline
        async with self._turns.turn(httpx.URL(url).host):
            try:
                async with asyncio.timeout(deadline):
                    return await self._follow(url, consume)
            except TimeoutError:
                raise FetchFailure(f"the download did not finish within {deadline:g} s") from None

    async def _follow(self, url: str, consume: Callable[[httpx.Response], Awaitable[T]]) -> T:
        """GET the URL, following redirects by hand; `consume` reads the final 200 answer."""
        p = self.policy.limits
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
                    return await consume(resp)
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
            p = self.policy.limits
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(self.policy.allow_private_addresses),
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
        _check_announced(resp, limit, progress)
        partial = self.cache.partial_file()
        hasher = hashlib.sha256()
        total = 0
        try:
            with partial.open("wb") as out:
                async for chunk in _chunks(resp, limit, self.policy.limits):
                    total += len(chunk)
                    progress.streamed(total)
                    hasher.update(chunk)
                    out.write(chunk)
            validate_safetensors(partial)
            return self.cache.add(url, partial, hasher.hexdigest(), total, resp.headers.get("etag"))
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise


def _check_announced(resp: httpx.Response, limit: int, progress: Progress) -> None:
    """Refuse at once a body whose Content-Length is over `limit`; tell `progress` the length."""
    length_header = resp.headers.get("content-length")
    if length_header is not None and length_header.isdigit():
        length = int(length_header)
        if length > limit:
            raise FetchFailure(f"the file is {human_bytes(length)}, over the {human_bytes(limit)} limit")
        progress.announced(length)


async def _chunks(resp: httpx.Response, limit: int, limits: TransferLimits) -> AsyncIterator[bytes]:
    """The body as it arrives (a drip is seen at once), failing past `limit` bytes or under the minimum
    rate."""
    total = 0
    rate = _RateCheck(limits)
    async for chunk in resp.aiter_raw():
        total += len(chunk)
        if total > limit:
            raise FetchFailure(f"the file is larger than the {human_bytes(limit)} limit")
        rate.check(total)
        yield chunk


class _Turns:
    """At most `total` downloads at once, and `per_host` from one host. A host's place in line is taken
    before a place in all, so downloads waiting on a busy host hold no place others could use."""

    def __init__(self, total: int, per_host: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_host = per_host
        self._hosts: dict[str, _Host] = {}

    @contextlib.asynccontextmanager
    async def turn(self, host: str) -> AsyncIterator[None]:
        line = self._hosts.setdefault(host, _Host(asyncio.Semaphore(self._per_host)))
        line.users += 1
        try:
            async with line.turns, self._total:
                yield
        finally:
            line.users -= 1
            if not line.users:  # nobody left for this host: nothing is kept per host once seen
                del self._hosts[host]


@dataclass
class _Host:
    turns: asyncio.Semaphore
    users: int = 0  # downloading or waiting


class _RateCheck:
    """Fails a download that moves slower than the minimum rate over a whole window (a slow drip that
    keeps the read timeout from ever firing)."""

    def __init__(self, limits: TransferLimits) -> None:
        self.limits = limits
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def check(self, total: int) -> None:
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < self.limits.rate_window:
            return
        rate = (total - self._window_bytes) / elapsed
        if rate < self.limits.min_rate:
            raise FetchFailure(
                f"the server sent {human_bytes(int(rate))}/s over {elapsed:.0f} s, under the minimum of "
                f"{human_bytes(self.limits.min_rate)}/s"
            )
        self._window_start, self._window_bytes = now, total
