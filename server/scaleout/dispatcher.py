"""The dispatcher deployment: the one place requests are queued and handed to the GPU worker replicas.

It is the single-process server's back office (`server.app.BackOffice`: fetch stage, queue, a worker slot
per possible GPU replica, completion, webhooks, metrics), as one Ray Serve replica that every ingress
replica asks through `RemoteDesk`. So exactly one dispatcher claims each request: the replica holds a
lock in the job store for its life (a second one, during a redeploy, waits for it). Ray Serve restarts a
dispatcher that dies; the new one takes back every request the store holds, as `serve` does at a start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pipeline.logs import configure_logging
from pipeline.models import Registry
from server.app import BackOffice, open_store
from server.config import Settings
from server.desk import RequestView
from server.jobs import JobRecord
from server.outcome import Outcome
from server.scaleout.remote_worker import LoraPlacement, RemoteWorker
from server.scheduler import CancelResult, NotAccepted
from server.supervisor import Worker
from server.worker_process import Listener

LOCK_NAME = "flux2-dispatcher"


class Dispatcher:
    # Ray Serve awaits an async constructor: the replica takes no request before the queue is back.
    async def __init__(self, settings: Settings, registry: Registry, workers: Any) -> None:  # type: ignore[misc]
        configure_logging(settings.log_level, settings.log_json)
        database, files = open_store(settings)
        self._release = await asyncio.to_thread(database.hold_lock, LOCK_NAME)
        placement = LoraPlacement(settings.ray_lora_sets_per_worker) if settings.ray_lora_affinity else None

        def remote(listener: Listener) -> Worker:
            return RemoteWorker(workers, listener, placement)

        self._database = database
        self._office = BackOffice(settings, registry, database, files, remote, settings.ray_workers_max)
        self._desk = self._office.desk
        self._drained = False
        await self._office.start()

    async def accept(self, record: JobRecord, queue_limit: int) -> RequestView | Outcome:
        """The view, or the refusal's outcome (returned, not raised: it crosses to the ingress whole)."""
        try:
            return await self._desk.accept(record, queue_limit)
        except NotAccepted as refused:
            return refused.outcome

    async def run(
        self, record: JobRecord, queue_limit: int, tick: float
    ) -> AsyncIterator[RequestView | Outcome]:
        """A sync run's views (first a refusal's outcome, if refused). One whose ingress goes away (its
        client hung up, its replica died) is cancelled: nobody is left to answer."""
        done = False
        try:
            async for view in self._desk.run(record, queue_limit, tick):
                done = view.done
                yield view
        except NotAccepted as refused:
            done = True
            yield refused.outcome
        finally:
            if not done:
                self._desk.scheduler.cancel(record.request_id)

    async def find(self, request_id: str) -> RequestView | None:
        return await self._desk.find(request_id)

    async def cancel(self, request_id: str) -> CancelResult:
        return await self._desk.cancel(request_id)

    async def watch(self, request_id: str, tick: float) -> AsyncIterator[RequestView]:
        async for view in self._desk.watch(request_id, tick):
            yield view

    async def readiness(self) -> dict[str, Any]:
        return await self._desk.readiness()

    async def metrics(self) -> bytes:
        return await self._desk.metrics()

    async def drain(self) -> None:
        """Stop as `serve` does: no job starts, running ones may finish within the grace period, what
        waits stays stored. `serve --ray` calls it before taking the application down, while the GPU
        workers still run; otherwise the replica's shutdown does (`__del__`)."""
        if not self._drained:
            self._drained = True
            await self._office.stop()

    async def __del__(self) -> None:
        """Ray Serve's shutdown of the replica: drain, then let go of the lock."""
        with contextlib.suppress(Exception):
            await self.drain()
        self._database.close()
        self._release()
