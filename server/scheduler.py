"""The scheduler: takes every accepted request to completion, through the fetch stage (LoRAs) and the
queue to the worker, with the client's start timeout and cancel on the way.

The rooms it joins each hold one job: `FetchStage`, `RequestQueue`, `WorkerPool` (a `WorkerSupervisor` per
worker) and `Completion`.
Everything here runs on the event loop's thread, the worker's messages too, so nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

from pipeline.messages import JobSucceeded
from server.completion import Completion
from server.fetch.stage import FetchStage
from server.jobs import JobRecord, JobStatus
from server.metrics import Metrics
from server.outcome import Failure, Outcome, failed, storage_failed
from server.outputs import OutputBuilder
from server.request_queue import RequestQueue
from server.store.job_store import WRITE_ERRORS, JobStore
from server.supervisor import WorkerFactory, WorkerState
from server.watchdog import WatchdogLimits
from server.webhooks import WebhookSender
from server.worker_pool import WorkerPool

log = logging.getLogger(__name__)


class CancelResult(StrEnum):
    REQUESTED = "CANCELLATION_REQUESTED"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"


class NotAccepted(Exception):
    """The request could not be stored, so it is not taken on (the submit answers with `outcome`)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class Scheduler:
    """`jobs` holds the requests in memory: the unfinished ones, and finished ones the store could not take
    yet (a full disk); every other finished request is read from the store when asked for (`find`)."""

    def __init__(
        self,
        spawn_worker: WorkerFactory,
        outputs: OutputBuilder,
        fetch: FetchStage,
        metrics: Metrics,
        store: JobStore | None = None,
        webhooks: WebhookSender | None = None,
        limits: WatchdogLimits | None = None,
        max_restarts: int = 3,
        worker_slots: int = 1,
    ) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.fetch = fetch
        self.queue = RequestQueue()
        self.workers = WorkerPool(spawn_worker, self, metrics, limits, max_restarts, worker_slots)
        self.completion = Completion(outputs, fetch, metrics, self._closed, store, webhooks)
        self.store = store
        self.metrics = metrics
        metrics.track_queue_depth(lambda: len(self.queue))
        self.draining = False  # shutting down: no new job starts, new requests are refused
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.workers.start()

    def begin_shutdown(self) -> None:
        """Start no more jobs: the running one may finish; what waits stays stored for the next start."""
        if not self.draining:
            self.draining = True
            log.warning("shutting down: %d requests stay queued for the next start", self.waiting)

    def stop_signal(self, again: bool) -> None:
        """A stop signal arrived: the first begins the shutdown, a second abandons the running job. Called
        from the signal handler (on the event loop's thread, between any two of its steps), so the work is
        done at the loop's next turn."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.workers.abandon if again else self.begin_shutdown)

    async def stop(self, grace: float = 0.0) -> None:
        """Let the running generations finish within `grace` seconds and record them; stop the workers."""
        self.begin_shutdown()
        self.fetch.stop()  # those requests are fetched again after the next start
        await self.workers.finish(grace)
        await self.completion.drain()
        self.workers.stop()

    # --- requests ----------------------------------------------------------------------------------------

    def accept(self, record: JobRecord) -> None:
        """Take ownership of a request; it will end COMPLETED whatever happens. A queue request is stored
        first: one that cannot be (a full disk) is refused with `NotAccepted`, never lost later."""
        if record.durable and self.store is not None:
            try:
                self.store.save(record)
            except WRITE_ERRORS as exc:
                log.error("refused: the job store could not be written: %s", exc)
                raise NotAccepted(storage_failed(exc, "the request could not be stored")) from exc
        self.jobs[record.request_id] = record
        log.info("accepted for %s", record.app_id, extra={"request_id": record.request_id})
        if record.outcome is not None:  # refused at validation: completed on arrival, as fal does
            self.completion.close(record, record.outcome)
            return
        self._admit(record)

    def recover(self) -> int:
        """Take back every request the store holds: finished ones stay readable, unfinished ones run
        (again, from the start: an interrupted generation cannot be resumed). Returns how many will run."""
        if self.store is None:
            return 0
        for record in self.store.load_unsent_webhooks():  # pending when the server stopped
            self.completion.send_webhook(record)
        unfinished = self.store.load_unfinished()
        for record in unfinished:
            self.jobs[record.request_id] = record
            record.status, record.started_at = JobStatus.IN_QUEUE, None
            record.log("requeued after a server restart", level="WARN")
            if record.start_timeout is not None:  # its start deadline keeps counting from acceptance
                record.start_timeout = max(0.0, record.created_at + record.start_timeout - time.time())
            self._admit(record)
        if unfinished:
            log.warning("recovered %d unfinished requests from the job store", len(unfinished))
        return len(unfinished)

    def find(self, request_id: str) -> JobRecord | None:
        """A request by id: from memory while it runs, from the store once it has finished."""
        record = self.jobs.get(request_id)
        if record is None and self.store is not None:
            record = self.store.load(request_id)
        return record

    def prune(self, max_age_seconds: float) -> int:
        """Forget requests completed more than `max_age_seconds` ago (in the store, by its index); returns
        how many. Also stores finished requests whose earlier write failed, now that it may succeed."""
        for record in [r for r in self.jobs.values() if r.done]:
            self._closed(record, self.completion.persist(record))
        if self.store is None:
            return 0
        return self.store.delete_finished_before(time.time() - max_age_seconds)

    def cancel(self, request_id: str) -> CancelResult:
        record = self.find(request_id)
        if record is None:
            return CancelResult.NOT_FOUND
        if record.done:
            return CancelResult.ALREADY_COMPLETED
        if record.status is JobStatus.IN_QUEUE:
            self._withdraw(record)
            self.completion.close(record, failed(Failure.CANCELLED, "Request was cancelled"))
        else:
            record.log("cancellation requested")
            self.workers.cancel(record)
        return CancelResult.REQUESTED

    def queue_position(self, record: JobRecord) -> int | None:
        """Requests ahead of a waiting one; one still fetching LoRAs is behind everything queued."""
        if record.status is not JobStatus.IN_QUEUE:
            return None
        position = self.queue.position(record)
        return len(self.queue) if position is None else position

    @property
    def waiting(self) -> int:
        """Accepted and not started: queued, or still fetching LoRAs."""
        return len(self.queue) + len(self.fetch)

    # --- on the way to the worker ------------------------------------------------------------------------

    def _admit(self, record: JobRecord) -> None:
        """Start the way to the worker for an accepted, valid request."""
        if self.workers.state is WorkerState.FAILED:
            self.completion.close(record, self._unavailable())
            return
        if record.start_timeout is not None:
            assert self._loop is not None, "the scheduler is not started"
            self._loop.call_later(record.start_timeout, self._start_expired, record)
        if record.loras or record.image_urls:  # fetched first, off the GPU's path; queued once local
            self.fetch.start(record, self._enqueue, self.completion.close)
        else:
            self._enqueue(record)

    def _enqueue(self, record: JobRecord) -> None:
        if self.workers.state is WorkerState.FAILED:
            self.completion.close(record, self._unavailable())
            return
        self.queue.push(record)
        self.worker_idle()

    def _withdraw(self, record: JobRecord) -> None:
        """Take a request that has not started out of the fetch stage or the queue."""
        if not self.fetch.withdraw(record):
            self.queue.remove(record)

    def _start_expired(self, record: JobRecord) -> None:
        if record.status is JobStatus.IN_QUEUE:
            self._withdraw(record)
            detail = f"Request did not start within {record.start_timeout:g} s"
            self.completion.close(record, failed(Failure.START_TIMEOUT, detail))

    def _unavailable(self) -> Outcome:
        return failed(Failure.UNAVAILABLE, f"the model is unavailable: {self.workers.failure}")

    # --- what the workers say ----------------------------------------------------------------------------

    def worker_idle(self) -> None:
        """Hand each idle worker the next waiting request, while there are both; a worker better placed
        for one a little further down the queue (it holds its LoRAs) takes that one."""
        while not self.draining and (slot := self.workers.idle_slot()) is not None:
            record = self.queue.pop(prefer=slot.prefers)
            if record is None:
                return
            record.move_to(JobStatus.IN_PROGRESS)
            self.completion.persist(record)
            self.metrics.started(record)
            log.info("started", extra={"request_id": record.request_id})
            slot.run(record)

    def job_ended(
        self, record: JobRecord, result: JobSucceeded | Outcome, inference_seconds: float | None
    ) -> None:
        if isinstance(result, JobSucceeded):
            self.completion.succeed(record, result)
            return
        record.log(result.error or "failed", level="ERROR")
        self.completion.close(record, result, inference_seconds)

    def _closed(self, record: JobRecord, saved: bool) -> None:
        """A request completed: memory lets go of it once the store has it (or it was never to be stored)."""
        if saved:
            self.jobs.pop(record.request_id, None)

    def worker_unavailable(self) -> None:
        for record in self.queue.drain():
            self.completion.close(record, self._unavailable())
