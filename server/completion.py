"""Completion: where every accepted request ends. Its outcome goes to the record (waking the sync route
and status streams), the store, the client's webhook and the metrics; its LoRA files are released.

A generation's images are written to disk in a worker thread while the GPU moves on to the next job;
the request completes once they are stored (or with a 500 when they cannot be: a full disk).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pipeline.messages import JobSucceeded
from server.fetch.stage import FetchStage
from server.jobs import JobRecord
from server.metrics import Metrics
from server.outcome import Outcome, storage_failed
from server.outputs import OutputBuilder
from server.store.job_store import WRITE_ERRORS, JobStore
from server.webhooks import WebhookSender, webhook_payload

log = logging.getLogger(__name__)


class Completion:
    def __init__(
        self,
        outputs: OutputBuilder,
        fetch: FetchStage,
        metrics: Metrics,
        closed: Callable[[JobRecord, bool], None],
        store: JobStore | None = None,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.outputs = outputs
        self.fetch = fetch
        self._closed = closed  # told of every request that completed, and whether the store has it
        self.metrics = metrics
        self.store = store
        self.webhooks = webhooks
        self._storing: set[asyncio.Task[None]] = set()

    def persist(self, record: JobRecord) -> bool:
        """Write a request's new state to the store; False when that failed. A failed write (a full disk)
        is logged and the request goes on in memory: the next write that succeeds brings its row up to
        date, and a restart before then runs it again rather than lose it."""
        if not record.durable or self.store is None:
            return True
        try:
            self.store.save(record)
        except WRITE_ERRORS as exc:
            log.error("the job store could not be written: %s", exc, extra={"request_id": record.request_id})
            return False
        return True

    def close(self, record: JobRecord, outcome: Outcome, inference_seconds: float | None = None) -> None:
        """The request is over: record its outcome everywhere it goes."""
        self.fetch.release(record)
        record.complete(outcome, inference_seconds)
        saved = self.persist(record)
        self.metrics.completed(record, outcome)
        self.send_webhook(record)
        result = "ok" if outcome.ok else f"{outcome.status_code} {outcome.error_type}: {outcome.error}"
        log.info("completed: %s", result, extra={"request_id": record.request_id})
        self._closed(record, saved)

    def succeed(self, record: JobRecord, result: JobSucceeded) -> None:
        """Store the images off the event loop, then close the request with its output."""
        task = asyncio.create_task(self._store_images(record, result))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    async def _store_images(self, record: JobRecord, result: JobSucceeded) -> None:
        try:
            outcome = await self.outputs.build(record, result)
        except WRITE_ERRORS as exc:  # a full disk, a store that went away: the request still completes
            log.error("storing the images failed: %s", exc, extra={"request_id": record.request_id})
            outcome = storage_failed(exc, "the images could not be stored")
            record.log(outcome.error or "", level="ERROR")
        self.close(record, outcome, result.inference_seconds)

    async def drain(self) -> None:
        """Wait for images being stored (at shutdown), so those requests complete first."""
        if self._storing:
            await asyncio.gather(*self._storing, return_exceptions=True)

    def send_webhook(self, record: JobRecord) -> None:
        """Deliver in the background; once it arrives or is given up on, the store stops asking for it. A
        delivery cut off by shutdown stays pending and is sent again after the restart (at least once: a
        receiver tells repeats by `request_id`)."""
        outcome = record.outcome
        if not record.webhook_pending or not record.webhook_url or self.webhooks is None or outcome is None:
            return
        rid = record.request_id
        body = webhook_payload(rid, rid, outcome.ok, outcome.body, None if outcome.ok else outcome.error)

        def settled(task: asyncio.Task[bool]) -> None:
            if task.cancelled():  # shut down: still pending
                return
            record.webhook_pending = False
            if self.store is not None:
                try:
                    self.store.settle_webhook(rid)
                except WRITE_ERRORS as exc:  # sent again after a restart: at least once, as promised
                    log.error("the job store could not be written: %s", exc, extra={"request_id": rid})

        self.webhooks.deliver(record.webhook_url, rid, body).add_done_callback(settled)
