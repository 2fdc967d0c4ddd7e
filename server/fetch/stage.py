"""The fetch stage: a request with LoRAs or reference images waits here, off the GPU's path, until its
files are local; then it is queued. A request can be withdrawn (cancel, start timeout) while its files are
on their way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from server.fetch.errors import LoraSourceError
from server.fetch.lora_fetcher import LocalLora, LoraFetcher
from server.fetch.reference_images import ReferenceFetcher, ReferenceImageError
from server.fetch.tasks import cancel_and_collect
from server.jobs import JobRecord
from server.outcome import Outcome, input_error


class FetchStage:
    def __init__(self, loras: LoraFetcher, references: ReferenceFetcher) -> None:
        self.loras = loras
        self.references = references
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._fetching)

    def start(
        self,
        record: JobRecord,
        fetched: Callable[[JobRecord], None],
        refused: Callable[[JobRecord, Outcome], None],
    ) -> None:
        """Fetch the request's files; then `fetched(record)`, or `refused(record, its 422)`."""
        self._fetching[record.request_id] = asyncio.create_task(self._fetch(record, fetched, refused))

    async def _fetch(
        self,
        record: JobRecord,
        fetched: Callable[[JobRecord], None],
        refused: Callable[[JobRecord, Outcome], None],
    ) -> None:
        for count, what in ((len(record.loras), "LoRA"), (len(record.image_urls), "reference image")):
            if count:
                record.log(f"fetching {count} {what}{'s' if count > 1 else ''}")
        loras = asyncio.create_task(self._fetch_loras(record))
        images = asyncio.create_task(self._fetch_images(record))
        try:
            record.fetched_loras, record.fetched_images = await asyncio.gather(loras, images)
        except (LoraSourceError, ReferenceImageError) as exc:
            await self._drop(loras, images)
            refused(record, _refusal(exc, record))
            return
        except BaseException:
            await self._drop(loras, images)
            raise
        finally:
            self._fetching.pop(record.request_id, None)
        fetched(record)

    async def _fetch_loras(self, record: JobRecord) -> list[LocalLora]:
        return await self.loras.fetch_all([lora.path for lora in record.loras]) if record.loras else []

    async def _fetch_images(self, record: JobRecord) -> list[Path]:
        if not record.image_urls:
            return []
        return await self.references.fetch_all(record.image_urls, record.owner, (record.base_url,))

    async def _drop(self, loras: asyncio.Task[list[LocalLora]], images: asyncio.Task[list[Path]]) -> None:
        """One half failed (or the request was withdrawn): stop the other, and let go of what it got."""
        images.cancel()  # both stop at once; their results are then collected one by one
        for fetched in await cancel_and_collect([loras]):
            self.loras.release(fetched)
        for stored in await cancel_and_collect([images]):
            await self.references.release(stored)

    def withdraw(self, record: JobRecord) -> bool:
        """Stop fetching for a request that will not run; False if it was not being fetched."""
        task = self._fetching.pop(record.request_id, None)
        if task is None:
            return False
        task.cancel()
        return True

    def release(self, record: JobRecord) -> None:
        """The request is done with its files: LoRAs may be evicted from the disk cache again, reference
        images are deleted (in the background: the caller is on the event loop)."""
        if record.fetched_loras:
            self.loras.release(record.fetched_loras)
            record.fetched_loras = []
        if record.fetched_images:
            task = asyncio.create_task(self.references.release(record.fetched_images))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            record.fetched_images = []

    def stop(self) -> None:
        for task in self._fetching.values():
            task.cancel()


def _refusal(exc: LoraSourceError | ReferenceImageError, record: JobRecord) -> Outcome:
    if isinstance(exc, ReferenceImageError):
        return input_error(("image_urls", exc.index), exc.message, "value_error", record.request_input)
    loc: tuple[str | int, ...] = ("loras",) if exc.index is None else ("loras", exc.index, "path")
    return input_error(loc, exc.message, "value_error", record.request_input)
