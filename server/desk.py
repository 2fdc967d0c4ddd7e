"""The routes' one way to the requests: accept, find, watch and cancel them, and say how the server stands
(readiness, metrics), all as plain values that can cross a process boundary.

`LocalDesk` answers from the scheduler in this process. On a scale-out ingress replica, `RemoteDesk`
(`server/scaleout/`) asks the one dispatcher that holds the queue, whose own `LocalDesk` answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import generate_latest

from server.jobs import JobRecord, JobStatus, LogEntry
from server.outcome import Failure, Outcome, failed
from server.scheduler import CancelResult, NotAccepted, Scheduler
from server.supervisor import WorkerState


@dataclass(frozen=True)
class RequestView:
    """A request as the routes answer about it, at one moment."""

    request_id: str
    app_id: str
    owner: str | None
    base_url: str
    status: JobStatus
    queue_position: int | None
    logs: tuple[LogEntry, ...]
    outcome: Outcome | None
    inference_seconds: float | None

    @property
    def done(self) -> bool:
        return self.status is JobStatus.COMPLETED


class Desk(Protocol):
    async def accept(self, record: JobRecord, queue_limit: int) -> RequestView:
        """Take the request on, or refuse it (`NotAccepted`): shutting down, more than `queue_limit`
        waiting, or a queue request that cannot be stored."""

    def run(self, record: JobRecord, queue_limit: int, tick: float) -> AsyncIterator[RequestView]:
        """A sync run: `accept`, then `watch` it (its record is not stored, so it is watched from here)."""

    async def find(self, request_id: str) -> RequestView | None: ...

    async def cancel(self, request_id: str) -> CancelResult: ...

    def watch(self, request_id: str, tick: float) -> AsyncIterator[RequestView]:
        """The request now, then again at each change and at least every `tick` seconds, until it is done
        (its last view) or it will not start before the server's next start (a shutdown)."""

    async def readiness(self) -> dict[str, Any]:
        """`/ready`'s body; its "ready" says the status code."""

    async def metrics(self) -> bytes:
        """The Prometheus exposition of the scheduler's metrics."""


class LocalDesk:
    """The desk over the scheduler in this process (the event loop's thread, like the scheduler)."""

    def __init__(self, scheduler: Scheduler, model: str) -> None:
        self.scheduler = scheduler
        self._model = model  # what /ready names before a worker has loaded one

    def view(self, record: JobRecord) -> RequestView:
        return RequestView(
            request_id=record.request_id,
            app_id=record.app_id,
            owner=record.owner,
            base_url=record.base_url,
            status=record.status,
            queue_position=self.scheduler.queue_position(record),
            logs=tuple(record.logs),
            outcome=record.outcome,
            inference_seconds=record.inference_seconds,
        )

    async def accept(self, record: JobRecord, queue_limit: int) -> RequestView:
        scheduler = self.scheduler
        if scheduler.draining:
            raise NotAccepted(failed(Failure.UNAVAILABLE, "The server is shutting down; try again shortly"))
        if scheduler.waiting >= queue_limit:
            detail = f"The queue is full ({scheduler.waiting} requests waiting)"
            raise NotAccepted(Outcome(429, {"detail": detail}, error=detail))
        scheduler.accept(record)
        return self.view(record)

    async def run(self, record: JobRecord, queue_limit: int, tick: float) -> AsyncIterator[RequestView]:
        await self.accept(record, queue_limit)
        async for view in self._follow(record, tick):
            yield view

    async def find(self, request_id: str) -> RequestView | None:
        record = self.scheduler.find(request_id)
        return None if record is None else self.view(record)

    async def cancel(self, request_id: str) -> CancelResult:
        return self.scheduler.cancel(request_id)

    async def watch(self, request_id: str, tick: float) -> AsyncIterator[RequestView]:
        record = self.scheduler.find(request_id)
        if record is not None:
            async for view in self._follow(record, tick):
                yield view

    async def _follow(self, record: JobRecord, tick: float) -> AsyncIterator[RequestView]:
        while True:
            seen = record.version
            view = self.view(record)
            yield view
            if view.done:
                return
            if record.version == seen and self.scheduler.draining and record.status is JobStatus.IN_QUEUE:
                return  # it will not start before the server's next start: do not hold the shutdown
            await record.wait_for_change(seen, tick)

    async def readiness(self) -> dict[str, Any]:
        workers = self.scheduler.workers
        info = workers.ready_info
        ready = workers.state is WorkerState.READY
        return {
            "ready": ready,
            "state": workers.state.value,
            "model": info.model if info else self._model,
            "device": info.device if info else None,
            "dtype": info.dtype if info else None,
            "compiled": info.compiled if info else None,
            "compile_seconds": info.compile_seconds if info else None,
            "compiled_graphs_reused": info.compiled_graphs_reused if info else None,
            "attention_backend": info.attention_backend if info else None,
            "memory_profile": info.memory_profile if info else None,
            "memory_bytes": dict(info.memory) if info else None,
            "worker_pid": info.pid if info and ready else None,
            "queue_depth": len(self.scheduler.queue),
            "worker_restarts": workers.restarts,
            "error": workers.failure,
        }

    async def metrics(self) -> bytes:
        return generate_latest(self.scheduler.metrics.registry)
