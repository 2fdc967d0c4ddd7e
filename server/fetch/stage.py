"""The fetch stage: a request with LoRAs waits here, off the GPU's path, until its files are local; then
it is queued. A request can be withdrawn (cancel, start timeout) while its files are on their way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.fetch.errors import LoraSourceError
from server.fetch.lora_fetcher import LoraFetcher
from server.jobs import JobRecord
from server.outcome import Outcome, input_error


class FetchStage:
    def __init__(self, fetcher: LoraFetcher) -> None:
        self.fetcher = fetcher
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._fetching)

    def start(
        self,
        record: JobRecord,
        fetched: Callable[[JobRecord], None],
        refused: Callable[[JobRecord, Outcome], None],
    ) -> None:
        """Fetch the request's LoRAs; then `fetched(record)`, or `refused(record, its 422)`."""
        self._fetching[record.request_id] = asyncio.create_task(self._fetch(record, fetched, refused))

    async def _fetch(
        self,
        record: JobRecord,
        fetched: Callable[[JobRecord], None],
        refused: Callable[[JobRecord, Outcome], None],
    ) -> None:
        count = len(record.loras)
        record.log(f"fetching {count} LoRA{'s' if count > 1 else ''}")
        try:
            record.fetched_loras = await self.fetcher.fetch_all([lora.path for lora in record.loras])
        except LoraSourceError as exc:
            loc: tuple[str | int, ...] = ("loras",) if exc.index is None else ("loras", exc.index, "path")
            refused(record, input_error(loc, exc.message, "value_error", record.request_input))
            return
        finally:
            self._fetching.pop(record.request_id, None)
        fetched(record)

    def withdraw(self, record: JobRecord) -> bool:
        """Stop fetching for a request that will not run; False if it was not being fetched."""
        task = self._fetching.pop(record.request_id, None)
        if task is None:
            return False
        task.cancel()
        return True

    def release(self, record: JobRecord) -> None:
        """The request is done with its files: they may be evicted from the disk cache again."""
        if record.fetched_loras:
            self.fetcher.release(record.fetched_loras)
            record.fetched_loras = []

    def stop(self) -> None:
        for task in self._fetching.values():
            task.cancel()
