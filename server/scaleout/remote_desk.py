"""The desk of a scale-out ingress replica: every question about requests goes to the dispatcher
deployment, which holds the queue; the ingress itself holds nothing a request needs, so any replica
answers for any request, and one that dies loses nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.desk import RequestView
from server.jobs import JobRecord
from server.outcome import Outcome
from server.scheduler import CancelResult, NotAccepted


class RemoteDesk:
    def __init__(self, dispatcher: DeploymentHandle[Any]) -> None:
        self._dispatcher = dispatcher

    def _stream(self, method: str, *args: Any) -> DeploymentResponseGenerator[Any]:
        handle = self._dispatcher.options(stream=True)
        return cast(DeploymentResponseGenerator[Any], getattr(handle, method).remote(*args))

    async def accept(self, record: JobRecord, queue_limit: int) -> RequestView:
        answer = await self._dispatcher.accept.remote(record, queue_limit)
        if isinstance(answer, Outcome):
            raise NotAccepted(answer)
        return cast(RequestView, answer)

    async def run(self, record: JobRecord, queue_limit: int, tick: float) -> AsyncIterator[RequestView]:
        views = self._stream("run", record, queue_limit, tick)
        try:
            async for view in views:
                if isinstance(view, Outcome):
                    raise NotAccepted(view)
                yield view
        finally:
            views.cancel()  # a client that hung up: the dispatcher cancels the run

    async def find(self, request_id: str) -> RequestView | None:
        return cast(RequestView | None, await self._dispatcher.find.remote(request_id))

    async def cancel(self, request_id: str) -> CancelResult:
        return cast(CancelResult, await self._dispatcher.cancel.remote(request_id))

    async def watch(self, request_id: str, tick: float) -> AsyncIterator[RequestView]:
        views = self._stream("watch", request_id, tick)
        try:
            async for view in views:
                yield view
        finally:
            views.cancel()

    async def readiness(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._dispatcher.readiness.remote())

    async def metrics(self) -> bytes:
        return cast(bytes, await self._dispatcher.metrics.remote())
