"""The queue front: accepts requests, orders them, feeds the worker one at a time, records outcomes.

Everything here runs on the event loop thread; the worker's messages arrive there too, so no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from pipeline.messages import (
    FailureKind,
    FromWorker,
    Job,
    JobFailed,
    JobStarted,
    JobSucceeded,
    StepProgress,
    WorkerReady,
    WorkerStartupFailed,
    WorkerStats,
)
from server.fetch.errors import LoraSourceError
from server.fetch.lora_fetcher import LoraFetcher
from server.jobs import JobRecord, JobStatus, Priority
from server.metrics import Metrics
from server.outcome import Failure, Outcome, failed, input_error, worker_failed
from server.outputs import OutputBuilder
from server.store.job_store import JobStore
from server.webhooks import WebhookSender, webhook_payload
from server.worker_process import Listener, WorkerExited

log = logging.getLogger(__name__)


class Worker(Protocol):
    """What the scheduler needs of a worker; `WorkerProcess` in production, stand-ins in unit tests."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def submit(self, job: Job) -> None: ...
    def cancel(self, request_id: str) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...


class WorkerState(StrEnum):
    STARTING = "starting"  # loading the model
    READY = "ready"
    FAILED = "failed"  # the model could not be loaded; nothing will run
    STOPPED = "stopped"


class CancelResult(StrEnum):
    REQUESTED = "CANCELLATION_REQUESTED"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"


class Scheduler:
    def __init__(
        self,
        outputs: OutputBuilder,
        loras: LoraFetcher,
        metrics: Metrics,
        run_timeout: float | None = None,
        store: JobStore | None = None,
        webhooks: WebhookSender | None = None,
        max_restarts: int = 3,
    ) -> None:
        self.outputs = outputs
        self.loras = loras
        self.metrics = metrics
        self.run_timeout = run_timeout
        self.store = store
        self.webhooks = webhooks
        metrics.track_queue_depth(lambda: self.queue_depth)
        self.jobs: dict[str, JobRecord] = {}
        self.state = WorkerState.STOPPED
        self.ready_info: WorkerReady | None = None
        self.failure: str | None = None
        self.restarts = 0
        self._max_restarts = max_restarts
        self._pending: dict[Priority, deque[JobRecord]] = {p: deque() for p in Priority}
        self._running: JobRecord | None = None
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self.file_owners: dict[str, str | None] = {}  # served file name -> owner of its request
        self._worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def listener(self) -> Listener:
        return self._on_message

    def start(self, worker: Worker) -> None:
        self._worker = worker
        self._loop = asyncio.get_running_loop()
        self.state = WorkerState.STARTING
        worker.start(self._loop)

    def stop(self) -> None:
        self.state = WorkerState.STOPPED
        for task in self._fetching.values():
            task.cancel()
        if self._worker is not None:
            self._worker.stop()

    # --- requests ----------------------------------------------------------------------------------------

    def accept(self, record: JobRecord) -> None:
        """Take ownership of a request; it will end COMPLETED whatever happens."""
        self.jobs[record.request_id] = record
        log.info("accepted for %s", record.app_id, extra={"request_id": record.request_id})
        if record.outcome is not None:  # refused at validation: completed on arrival, as fal does
            record.move_to(JobStatus.COMPLETED)
            self._persist(record)
            self._announce(record)
            return
        self._persist(record)
        self._admit(record)

    def recover(self) -> int:
        """Take back every request the store holds: finished ones stay readable, unfinished ones run
        (again, from the start: an interrupted generation cannot be resumed). Returns how many will run."""
        if self.store is None:
            return 0
        pending = 0
        for record in self.store.load_all():
            self.jobs[record.request_id] = record
            if record.done:
                self._index_files(record)
                self._send_webhook(record)  # only if it was still pending when the server stopped
                continue
            pending += 1
            record.status, record.started_at = JobStatus.IN_QUEUE, None
            record.log("requeued after a server restart", level="WARN")
            if record.start_timeout is not None:  # its start deadline keeps counting from acceptance
                record.start_timeout = max(0.0, record.created_at + record.start_timeout - time.time())
            self._admit(record)
        if pending:
            log.warning("recovered %d unfinished requests from the job store", pending)
        return pending

    def prune(self, max_age_seconds: float) -> list[JobRecord]:
        """Forget requests completed more than `max_age_seconds` ago; returns them (their files go too)."""
        cutoff = time.time() - max_age_seconds
        gone = [
            r for r in self.jobs.values() if r.done and r.finished_at is not None and r.finished_at < cutoff
        ]
        for record in gone:
            del self.jobs[record.request_id]
            for name in _file_names(record):
                self.file_owners.pop(name, None)
        if self.store is not None:
            self.store.delete_finished_before(cutoff)
        return gone

    def _announce(self, record: JobRecord) -> None:
        """A request just completed: count it, and deliver its webhook if it asked for one."""
        assert record.outcome is not None
        self.metrics.completed(record, record.outcome)
        self._send_webhook(record)

    def _send_webhook(self, record: JobRecord) -> None:
        """Deliver in the background; once it arrives or is given up on, the store stops asking for it. A
        delivery cut off by shutdown stays pending and is sent again after the restart (at least once: a
        receiver tells repeats by `request_id`)."""
        outcome = record.outcome
        if not record.webhook_pending or not record.webhook_url or self.webhooks is None or outcome is None:
            return
        rid = record.request_id
        body = webhook_payload(rid, rid, outcome.ok, outcome.body, None if outcome.ok else outcome.error)

        def settled(task: asyncio.Task[bool]) -> None:
            if task.cancelled() or self.jobs.get(rid) is not record:  # shut down, or already forgotten
                return
            record.webhook_pending = False
            self._persist(record)

        self.webhooks.deliver(record.webhook_url, rid, body).add_done_callback(settled)

    def _index_files(self, record: JobRecord) -> None:
        for name in _file_names(record):
            self.file_owners[name] = record.owner

    def _persist(self, record: JobRecord) -> None:
        if record.durable and self.store is not None:
            self.store.save(record)

    def _admit(self, record: JobRecord) -> None:
        """Start the way to the worker for an accepted, valid request."""
        if self.state is WorkerState.FAILED:
            self._close(record, self._unavailable())
            return
        assert record.params is not None
        if record.start_timeout is not None:
            self._call_later(record.start_timeout, self._start_expired, record)
        if record.loras:  # fetched here, off the GPU's path; queued once the files are local
            self._fetching[record.request_id] = asyncio.create_task(self._fetch_loras(record))
            return
        self._enqueue(record)

    def _enqueue(self, record: JobRecord) -> None:
        if self.state is WorkerState.FAILED:
            self._close(record, self._unavailable())
            return
        self._pending[record.priority].append(record)
        self._dispatch()

    async def _fetch_loras(self, record: JobRecord) -> None:
        loras = record.loras
        record.log(f"fetching {len(loras)} LoRA{'s' if len(loras) > 1 else ''}")
        try:
            fetched = await self.loras.fetch_all([lora.path for lora in loras])
        except LoraSourceError as exc:
            loc: tuple[str | int, ...] = ("loras",) if exc.index is None else ("loras", exc.index, "path")
            self._close(record, input_error(loc, exc.message, "value_error", record.request_input))
            return
        finally:
            self._fetching.pop(record.request_id, None)
        record.fetched_loras = fetched
        self._enqueue(record)

    def queue_position(self, record: JobRecord) -> int | None:
        if record.status is not JobStatus.IN_QUEUE:
            return None
        ahead = 0
        for priority in Priority:
            queue = self._pending[priority]
            if record in queue:
                return ahead + queue.index(record)
            ahead += len(queue)
        return ahead

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._pending.values())

    @property
    def waiting(self) -> int:
        """Accepted and not started: queued, or still fetching LoRAs."""
        return self.queue_depth + len(self._fetching)

    def _call_later(self, delay: float, callback: Callable[[JobRecord], None], record: JobRecord) -> None:
        assert self._loop is not None, "the scheduler is not started"
        self._loop.call_later(delay, callback, record)

    def _withdraw(self, record: JobRecord) -> None:
        """Take a request that has not started out of the fetch stage or its queue."""
        fetching = self._fetching.pop(record.request_id, None)
        if fetching is not None:
            fetching.cancel()
        else:
            self._pending[record.priority].remove(record)

    def _start_expired(self, record: JobRecord) -> None:
        if record.status is JobStatus.IN_QUEUE:
            self._withdraw(record)
            self._close(
                record,
                failed(Failure.START_TIMEOUT, f"Request did not start within {record.start_timeout:g} s"),
            )

    def _run_expired(self, record: JobRecord) -> None:
        if self._running is record and self._worker is not None:
            record.timed_out = True
            record.log(f"stopping: ran longer than {self.run_timeout:g} s", level="ERROR")
            self._worker.cancel(record.request_id)

    def cancel(self, request_id: str) -> CancelResult:
        record = self.jobs.get(request_id)
        if record is None:
            return CancelResult.NOT_FOUND
        if record.done:
            return CancelResult.ALREADY_COMPLETED
        if record.status is JobStatus.IN_QUEUE:
            self._withdraw(record)
            self._close(record, failed(Failure.CANCELLED, "Request was cancelled"))
        elif self._worker is not None:
            record.log("cancellation requested")
            self._worker.cancel(request_id)
        return CancelResult.REQUESTED

    # --- the worker --------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self.state is not WorkerState.READY or self._running is not None or self._worker is None:
            return
        for priority in Priority:
            if self._pending[priority]:
                record = self._pending[priority].popleft()
                break
        else:
            return
        assert record.params is not None
        self._running = record
        record.move_to(JobStatus.IN_PROGRESS)
        self._persist(record)
        self.metrics.started(record)
        if self.run_timeout is not None:
            self._call_later(self.run_timeout, self._run_expired, record)
        log.info("started", extra={"request_id": record.request_id})
        self._worker.submit(record.job())

    def _on_message(self, message: FromWorker | WorkerExited) -> None:
        running = self._running
        if isinstance(message, WorkerReady):
            self.state, self.ready_info, self.failure = WorkerState.READY, message, None
            log.warning(
                "READY: model %r on %s (%s, memory profile %r, %s, attention %s), loaded in %.1f s",
                message.model,
                message.device,
                message.dtype,
                message.memory_profile,
                "compiled" if message.compiled else "eager",
                message.attention_backend,
                message.load_seconds,
            )
        elif isinstance(message, WorkerStartupFailed):
            self._fail_permanently(f"the model could not be loaded: {message.message}")
        elif isinstance(message, WorkerExited):
            self._on_worker_exit(message)
        elif isinstance(message, WorkerStats):
            self.metrics.worker_stats(message)
        elif running is None or message.request_id != running.request_id:
            log.error("ignoring a worker message for a request not in progress: %r", message)
        elif isinstance(message, JobStarted):
            running.log("generation started")
        elif isinstance(message, StepProgress):
            running.log(f"step {message.step}/{message.total}")
        elif isinstance(message, JobSucceeded):
            self._finish(running, self.outputs.build(running, message), message.inference_seconds)
        elif isinstance(message, JobFailed) and running.timed_out and message.kind is FailureKind.CANCELLED:
            timeout = failed(Failure.RUN_TIMEOUT, f"Generation ran longer than {self.run_timeout:g} s")
            self._finish(running, timeout, message.inference_seconds)
        elif isinstance(message, JobFailed):
            self._finish(running, worker_failed(message, running.request_input), message.inference_seconds)
        self._dispatch()

    def _finish(self, record: JobRecord, outcome: Outcome, inference_seconds: float | None) -> None:
        self._running = None
        if not outcome.ok:
            record.log(outcome.error or "failed", level="ERROR")
        self._close(record, outcome, inference_seconds)

    def _close(self, record: JobRecord, outcome: Outcome, inference_seconds: float | None = None) -> None:
        """Every accepted request ends here: completed, and its LoRA files unpinned for eviction."""
        if record.fetched_loras:
            self.loras.release(record.fetched_loras)
            record.fetched_loras = []
        record.complete(outcome, inference_seconds)
        self._index_files(record)
        self._persist(record)
        self._announce(record)
        result = "ok" if outcome.ok else f"{outcome.status_code} {outcome.error_type}: {outcome.error}"
        log.info("completed: %s", result, extra={"request_id": record.request_id})

    def _on_worker_exit(self, exited: WorkerExited) -> None:
        detail = f"the GPU worker exited unexpectedly (exit code {exited.exitcode})"
        if self._running is not None:
            self._finish(self._running, failed(Failure.WORKER_LOST, detail), None)
        if self.state is not WorkerState.READY or self.restarts >= self._max_restarts:
            self._fail_permanently(detail)
            return
        self.restarts += 1
        self.metrics.worker_restarts.inc()
        log.error("%s; restarting it (%d of %d)", detail, self.restarts, self._max_restarts)
        assert self._worker is not None and self._loop is not None
        self.state = WorkerState.STARTING
        self._worker.start(self._loop)

    def _fail_permanently(self, reason: str) -> None:
        log.error("NOT SERVING: %s", reason)
        self.state, self.failure = WorkerState.FAILED, reason
        for queue in self._pending.values():
            while queue:
                self._close(queue.popleft(), self._unavailable())

    def _unavailable(self) -> Outcome:
        return failed(Failure.UNAVAILABLE, f"the model is unavailable: {self.failure}")


def _file_names(record: JobRecord) -> list[str]:
    """The stored image files of a completed request (none for errors and `sync_mode` data URIs)."""
    if record.outcome is None or not record.outcome.ok or record.sync_mode:
        return []
    return [image["file_name"] for image in record.outcome.body.get("images", [])]
