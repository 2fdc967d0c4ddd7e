"""The worker supervisor: starts the GPU worker, hands it one job at a time, reads what it says, and
replaces it when it dies or hangs (up to `max_restarts` times): the watchdog says when it hangs, and a
hung worker is killed, child processes and all, rather than asked.

`Worker` is the seam: `WorkerProcess` (a spawned child) in production, stand-ins in unit tests,
`RemoteWorker` (a stream of jobs to Ray Serve replicas) in scale-out. Everything here runs on the event
loop's thread, where the worker's messages arrive too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from pipeline.messages import (
    FailureKind,
    FromWorker,
    Job,
    JobFailed,
    JobNote,
    JobStarted,
    JobSucceeded,
    StepProgress,
    WorkerReady,
    WorkerStartupFailed,
    WorkerStats,
)
from server.jobs import IllegalTransition, JobRecord
from server.metrics import Metrics
from server.outcome import Failure, Outcome, failed, worker_failed
from server.watchdog import Hang, Watchdog, WatchdogLimits
from server.worker_process import Listener, WorkerExited

log = logging.getLogger(__name__)


class Worker(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def submit(self, job: Job) -> None: ...
    def cancel(self, request_id: str) -> None: ...
    def kill(self) -> None: ...  # at once, without asking: it exits, and says so (`WorkerExited`)
    def stop(self, timeout: float = 10.0) -> None: ...
    def prefers(self, job: Job) -> bool: ...  # better placed for it than for others (holds its LoRAs)


WorkerFactory = Callable[[Listener], Worker]  # given where to send the worker's messages


class WorkerState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"  # loading the model
    READY = "ready"
    FAILED = "failed"  # the model could not be loaded, or the worker died too often: nothing will run


_ALLOWED = {
    WorkerState.STOPPED: {WorkerState.STARTING},
    WorkerState.STARTING: {WorkerState.READY, WorkerState.FAILED, WorkerState.STOPPED},
    WorkerState.READY: {WorkerState.STARTING, WorkerState.FAILED, WorkerState.STOPPED},  # a restart
    WorkerState.FAILED: {WorkerState.STOPPED},
}


class SupervisorEvents(Protocol):
    """What the supervisor tells the scheduler."""

    def job_ended(
        self, record: JobRecord, result: JobSucceeded | Outcome, inference_seconds: float | None
    ) -> None:
        """The job in hand is over: its images, or the failure to answer with."""

    def worker_unavailable(self) -> None:
        """The worker entered FAILED: nothing will run any more."""

    def worker_idle(self) -> None:
        """The worker may take the next job (called after every message)."""


class WorkerSupervisor:
    def __init__(
        self,
        spawn: WorkerFactory,
        events: SupervisorEvents,
        metrics: Metrics,
        limits: WatchdogLimits | None = None,
        max_restarts: int = 3,
    ) -> None:
        self._spawn = spawn
        self._events = events
        self._metrics = metrics
        self.limits = limits or WatchdogLimits()
        self.max_restarts = max_restarts
        self.state = WorkerState.STOPPED
        self.ready_info: WorkerReady | None = None
        self.failure: str | None = None
        self.restarts = 0
        self.running: JobRecord | None = None  # the job in hand
        self._worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog = Watchdog(self.limits, self._overran, self._hung)
        self._job_ended = asyncio.Event()
        self._killed: str | None = None  # why the watchdog killed the worker, until its exit is seen
        self._replacing = False  # killed while serving: start a new one once the old one is gone

    @property
    def idle(self) -> bool:
        return self.state is WorkerState.READY and self.running is None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._spawn(self._on_message)
        self._watchdog.start()
        self._launch()

    def stop(self) -> None:
        self._watchdog.stop()
        if self.state is not WorkerState.STOPPED:
            self._move_to(WorkerState.STOPPED)
        if self._worker is not None:
            self._worker.stop()

    def run(self, record: JobRecord) -> None:
        """Hand the worker its next job; only when idle."""
        assert self.idle and self._worker is not None
        self.running = record
        self._job_ended.clear()
        self._watchdog.running()
        self._worker.submit(record.job())

    async def finish(self, timeout: float) -> None:
        """At shutdown: let the job in hand end, for at most `timeout` seconds, then kill the worker. A
        request stopped that way stays IN_PROGRESS in the store and runs again after the next start."""
        if self.running is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._job_ended.wait(), timeout)
        if self.running is not None and self.state is not WorkerState.STOPPED:  # not abandoned already
            log.warning("the running request did not finish within %g s", timeout)
            self.abandon()

    def abandon(self) -> None:
        """Stop now, without waiting for the job in hand (a forced shutdown): the worker is killed and
        nothing more is recorded, so that request stays IN_PROGRESS in the store and runs again after the
        next start."""
        self._watchdog.stop()
        if self.running is not None:
            log.warning("stopping now: the running request runs again after the next start")
        if self.state is not WorkerState.STOPPED:
            self._move_to(WorkerState.STOPPED)
        self._job_ended.set()
        if self._worker is not None:
            self._worker.kill()
            self._worker.stop(timeout=2.0)

    def prefers(self, record: JobRecord) -> bool:
        """Whether the worker is better placed for this waiting request than for others."""
        return self._worker is not None and self._worker.prefers(record.job())

    def cancel(self, record: JobRecord) -> None:
        """Ask the worker to stop the job in hand at its next step (it answers with JobFailed)."""
        if self._worker is not None:
            self._worker.cancel(record.request_id)

    def _move_to(self, state: WorkerState) -> None:
        if state not in _ALLOWED[self.state]:
            raise IllegalTransition(f"worker: {self.state.value} -> {state.value}")
        self.state = state

    def _launch(self) -> None:
        assert self._worker is not None and self._loop is not None
        if self.state is not WorkerState.STARTING:
            self._move_to(WorkerState.STARTING)
        self._watchdog.loading()
        self._worker.start(self._loop)

    def _overran(self) -> None:
        """The job in hand reached the run timeout: ask it to stop at its next step."""
        record = self.running
        if record is not None:
            record.timed_out = True
            record.log(f"stopping: ran longer than {self.limits.run_timeout:g} s", level="ERROR")
            self.cancel(record)

    def _hung(self, hang: Hang) -> None:
        """Kill a hung worker. The job in hand fails now; a new worker starts once the old one's exit is
        seen (a load that hung is a failed start: the same load would hang again)."""
        limits = self.limits
        if hang is Hang.STARTUP:
            self._killed = f"the model did not load within {limits.startup:g} s"
        else:
            if hang is Hang.RUN_TIMEOUT:
                self._killed = f"the GPU worker did not stop within {limits.cancel_grace:g} s of being asked"
                detail = (
                    f"Generation ran longer than {limits.run_timeout:g} s; {self._killed}, and was restarted"
                )
                outcome = failed(Failure.RUN_TIMEOUT, detail)
            else:
                self._killed = f"the GPU worker sent nothing for {limits.heartbeat:g} s (hung)"
                outcome = failed(Failure.WORKER_LOST, f"{self._killed}, and was restarted")
            self._replacing = True
            self._move_to(WorkerState.STARTING)  # no job goes to it any more
            if self.running is not None:
                self._end(self.running, outcome, None)
        self._metrics.watchdog_kills.labels(hang.value).inc()
        log.error("WATCHDOG: %s; killing the worker", self._killed)
        assert self._worker is not None
        self._worker.kill()

    def _on_message(self, message: FromWorker | WorkerExited) -> None:
        if self.state is WorkerState.STOPPED:
            return  # shutting down: nothing more is recorded
        if isinstance(message, WorkerReady):
            self._ready(message)
        elif isinstance(message, WorkerStartupFailed):
            self._fail(f"the model could not be loaded: {message.message}")
        elif isinstance(message, WorkerExited):
            self._exited(message)
        elif isinstance(message, WorkerStats):
            self._metrics.worker_stats(message)
        else:
            self._job_message(message)
        self._events.worker_idle()

    def _ready(self, ready: WorkerReady) -> None:
        self._move_to(WorkerState.READY)
        self._watchdog.idle()
        self.ready_info, self.failure = ready, None
        log.warning(
            "READY: model %r on %s (%s, memory profile %r, %s, attention %s), loaded in %.1f s",
            ready.model,
            ready.device,
            ready.dtype,
            ready.memory_profile,
            "compiled" if ready.compiled else "eager",
            ready.attention_backend,
            ready.load_seconds,
        )

    def _job_message(self, message: JobStarted | JobNote | StepProgress | JobSucceeded | JobFailed) -> None:
        record = self.running
        if record is None or message.request_id != record.request_id:
            log.error("ignoring a worker message for a request not in progress: %r", message)
            return
        self._watchdog.heard()
        if isinstance(message, JobStarted):
            self._started(record, message)
        elif isinstance(message, JobNote):
            record.log(message.message, level="WARN")
        elif isinstance(message, StepProgress):
            record.log(f"step {message.step}/{message.total}")
        elif isinstance(message, JobSucceeded):
            self._end(record, message, message.inference_seconds)
        elif record.timed_out and message.kind is FailureKind.CANCELLED:
            self._end(
                record,
                failed(Failure.RUN_TIMEOUT, f"Generation ran longer than {self.limits.run_timeout:g} s"),
                message.inference_seconds,
            )
        else:
            self._end(record, worker_failed(message, record.request_input), message.inference_seconds)

    def _started(self, record: JobRecord, started: JobStarted) -> None:
        text = "generation started"
        if started.worker:  # one of several: say which, and whether it had the LoRAs at hand
            text += f" on {started.worker}"
            if record.loras:
                text += ", LoRAs already in memory" if started.loras_in_memory else ", reading its LoRAs"
        record.log(text)
        if record.loras:
            self._metrics.lora_sets.labels(str(started.loras_in_memory).lower()).inc()

    def _end(
        self, record: JobRecord, result: JobSucceeded | Outcome, inference_seconds: float | None
    ) -> None:
        self.running = None
        self._job_ended.set()
        self._watchdog.idle()
        self._events.job_ended(record, result, inference_seconds)

    def _exited(self, exited: WorkerExited) -> None:
        if self.state is WorkerState.FAILED:
            return  # it already said why it stopped (the model could not be loaded)
        detail = self._killed or f"the GPU worker exited unexpectedly (exit code {exited.exitcode})"
        replacing, self._killed, self._replacing = self._replacing, None, False
        if self.running is not None:
            self._end(self.running, failed(Failure.WORKER_LOST, detail), None)
        if not (self.state is WorkerState.READY or replacing) or self.restarts >= self.max_restarts:
            self._fail(detail)
            return
        self.restarts += 1
        self._metrics.worker_restarts.inc()
        log.error("%s; restarting it (%d of %d)", detail, self.restarts, self.max_restarts)
        self._launch()

    def _fail(self, reason: str) -> None:
        log.error("NOT SERVING: %s", reason)
        self._watchdog.idle()
        self._move_to(WorkerState.FAILED)
        self.failure = reason
        self._events.worker_unavailable()
