"""A request's LoRA files onto local disk: every entry at once, one shared fetch per source, a byte budget
per request, and the files pinned in the disk cache until the request is done with them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.messages import ResolvedLora
from server.fetch.disk_cache import DiskCache
from server.fetch.downloads import Downloader, DownloadPolicy, Progress, TransferLimits
from server.fetch.errors import FetchFailure, LoraSourceError, human_bytes
from server.fetch.hub import hub_file
from server.fetch.lora_paths import LoraPaths, LoraSource
from server.fetch.safetensors_check import CheckedFile, sha256_file, validate_safetensors
from server.fetch.tasks import cancel_and_collect


@dataclass(frozen=True)
class LoraPolicy:
    """What a request may fetch and where it is kept. Private addresses are off by default (SSRF)."""

    cache_dir: Path
    folders: tuple[Path, ...] = ()
    allow_private_addresses: bool = False
    max_total_bytes: int = 5 * 1024**3  # fal's cap, per request
    cache_max_bytes: int = 50 * 1024**3
    transfers: TransferLimits = field(default_factory=TransferLimits)


@dataclass(frozen=True)
class LoraRequest:
    """One entry of a request's `loras`, as asked for."""

    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class LocalLora:
    """A LoRA on local disk: `file` is a validated safetensors file whose content hashes to `sha256`."""

    source: str
    file: Path
    sha256: str
    size: int


def resolved(requested: Sequence[LoraRequest], fetched: Sequence[LocalLora]) -> tuple[ResolvedLora, ...]:
    """The LoRAs as the worker takes them: each requested entry with the file it was fetched to."""
    return tuple(
        ResolvedLora(str(local.file), local.sha256, lora.scale, lora.path)
        for lora, local in zip(requested, fetched, strict=True)
    )


@dataclass
class _Budget:
    """A request's running byte total; overflow cancels the request's tasks as soon as it happens."""

    limit: int
    charged: dict[str, int] = field(default_factory=dict)
    error: LoraSourceError | None = None
    tasks: list[asyncio.Task[LocalLora]] = field(default_factory=list)
    entries: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (index, path)

    def charge(self, key: str, total_for_key: int) -> None:
        if self.error is not None or total_for_key <= self.charged.get(key, 0):
            return
        self.charged[key] = total_for_key
        if sum(self.charged.values()) > self.limit:
            self.fail(key)

    def would_exceed(self, key: str, size: int) -> bool:
        others = sum(v for k, v in self.charged.items() if k != key)
        return others + size > self.limit

    def fail(self, key: str) -> None:
        index, path = self.entries[key]
        self.error = LoraSourceError(
            f"LoRA {index} ({path}): the request's LoRAs together exceed the "
            f"{human_bytes(self.limit)} limit on total LoRA size",
            index,
        )
        for task in self.tasks:
            task.cancel()


@dataclass
class _Flight:
    """One fetch of one source, shared by every request that asked for it meanwhile."""

    key: str
    task: asyncio.Task[CheckedFile] | None = None
    budgets: list[_Budget] = field(default_factory=list)
    waiters: int = 0
    streamed: int = 0
    announced: int | None = None

    def progress(self) -> Progress:
        def announced(length: int) -> None:
            self.announced = length
            for budget in list(self.budgets):
                if budget.would_exceed(self.key, length):
                    budget.fail(self.key)

        def streamed(total: int) -> None:
            self.streamed = total
            for budget in list(self.budgets):
                budget.charge(self.key, total)

        return Progress(announced, streamed)


class LoraFetcher:
    """Fetches a request's LoRAs concurrently into a content-addressed, LRU-evicted disk cache.

    One fetcher per cache directory. Blobs returned by `fetch_all` stay pinned (never evicted) until
    `release`; `using` does both. Call `aclose` at shutdown.
    """

    def __init__(self, policy: LoraPolicy) -> None:
        self.policy = policy
        self.paths = LoraPaths(policy.folders, policy.allow_private_addresses)
        self.cache = DiskCache(policy.cache_dir, policy.cache_max_bytes)
        downloads = DownloadPolicy(policy.max_total_bytes, policy.allow_private_addresses, policy.transfers)
        self.downloads = Downloader(downloads, self.cache)
        self._flights: dict[str, _Flight] = {}
        self._local_hashes: dict[tuple[str, int, int, int], str] = {}

    async def fetch_all(self, paths: Sequence[str]) -> list[LocalLora]:
        """Fetch every entry concurrently; the first failure cancels the rest and is raised.

        The returned blobs are pinned against eviction until `release` is called with them.
        """
        budget = _Budget(self.policy.max_total_bytes)
        sources = [self.paths.classify(i, p) for i, p in enumerate(paths)]
        for i, (source, path) in enumerate(zip(sources, paths, strict=True)):
            budget.entries.setdefault(source.key, (i, path))
        budget.tasks = [
            asyncio.create_task(self._fetch_one(i, p, s, budget))
            for i, (p, s) in enumerate(zip(paths, sources, strict=True))
        ]
        try:
            await asyncio.gather(*budget.tasks)
        except BaseException as exc:
            self.release(await cancel_and_collect(budget.tasks))
            if budget.error is not None and not isinstance(exc, LoraSourceError):
                raise budget.error from None
            raise
        loras = [t.result() for t in budget.tasks]
        self.cache.evict()
        return loras

    def release(self, loras: Iterable[LocalLora]) -> None:
        """Unpin blobs so they may be evicted again (call once the worker has loaded them)."""
        for lora in loras:
            self.cache.unpin(lora.sha256)
        self.cache.evict()

    @contextlib.asynccontextmanager
    async def using(self, paths: Sequence[str]) -> AsyncIterator[list[LocalLora]]:
        """`fetch_all` then `release` when the block ends."""
        loras = await self.fetch_all(paths)
        try:
            yield loras
        finally:
            self.release(loras)

    async def aclose(self) -> None:
        await self.downloads.aclose()

    async def _fetch_one(self, index: int, path: str, source: LoraSource, budget: _Budget) -> LocalLora:
        flight = self._flights.get(source.key)
        if flight is None:
            flight = self._flights[source.key] = _Flight(source.key)
            flight.task = asyncio.create_task(self._run_flight(source, flight))
        assert flight.task is not None
        flight.waiters += 1
        flight.budgets.append(budget)
        if flight.announced is not None and budget.would_exceed(source.key, flight.announced):
            budget.fail(source.key)
        budget.charge(source.key, flight.streamed)
        got_result = False
        try:
            result = await asyncio.shield(flight.task)
            got_result = True
        except FetchFailure as exc:
            raise LoraSourceError(f"LoRA {index} ({path}): {exc}", index) from None
        finally:
            flight.waiters -= 1
            with contextlib.suppress(ValueError):
                flight.budgets.remove(budget)
            if not got_result:
                if flight.task.done():
                    if not flight.task.cancelled() and flight.task.exception() is None:
                        self.cache.unpin(flight.task.result().sha256)  # this waiter's pin, never collected
                elif flight.waiters == 0:
                    flight.task.cancel()
                    await asyncio.wait({flight.task})
        budget.charge(source.key, result.size)
        if budget.error is not None:
            self.cache.unpin(result.sha256)
            raise budget.error
        return LocalLora(path, result.file, result.sha256, result.size)

    async def _run_flight(self, source: LoraSource, flight: _Flight) -> CheckedFile:
        try:
            if source.kind == "url":
                result = await self.downloads.download(source.key, flight.progress())
            elif source.kind == "local":
                result = await asyncio.to_thread(self._local, Path(source.key))
            else:
                result = await self._from_hub(source)
            # one pin per waiter, taken before any of them resumes, so no eviction can slip in between
            self.cache.pin(result.sha256, flight.waiters)
            return result
        finally:
            if self._flights.get(source.key) is flight:
                del self._flights[source.key]

    async def _from_hub(self, source: LoraSource) -> CheckedFile:
        """huggingface_hub downloads in a thread, which cannot be stopped: past the deadline the request
        fails, and the thread ends by huggingface_hub's own read timeout (HF_HUB_DOWNLOAD_TIMEOUT)."""
        deadline = self.policy.transfers.deadline
        try:
            async with asyncio.timeout(deadline):
                file = await asyncio.to_thread(hub_file, source, self.policy.max_total_bytes)
        except TimeoutError:
            raise FetchFailure(f"the Hugging Face download did not finish within {deadline:g} s") from None
        return await asyncio.to_thread(self._local, file)

    def _local(self, real: Path) -> CheckedFile:
        """A file already on this machine (a LoRA folder, the Hugging Face cache): checked and hashed, the
        hash remembered while the file stays the same."""
        st = real.stat()
        limit = self.policy.max_total_bytes
        if st.st_size > limit:
            raise FetchFailure(f"the file is {human_bytes(st.st_size)}, over the {human_bytes(limit)} limit")
        validate_safetensors(real)
        key = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = self._local_hashes.get(key)
        if sha is None:
            sha = self._local_hashes[key] = sha256_file(real)
        return CheckedFile(real, sha, st.st_size)
