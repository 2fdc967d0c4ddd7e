"""The workers the scheduler hands jobs to, as one: a `WorkerSupervisor` per worker slot, each with one
job in hand at most. The single-process server has one slot (its spawned child); scale-out has as many
as there can be GPU replicas, each slot a stream of jobs to the Ray Serve deployment.

The pool is READY while any slot is, and FAILED only once every slot is: one broken slot never takes
the others down.
"""

from __future__ import annotations

import asyncio

from pipeline.messages import JobSucceeded, WorkerReady
from server.jobs import JobRecord
from server.metrics import Metrics
from server.outcome import Outcome
from server.supervisor import SupervisorEvents, WorkerFactory, WorkerState, WorkerSupervisor
from server.watchdog import WatchdogLimits


class WorkerPool:
    def __init__(
        self,
        spawn: WorkerFactory,
        events: SupervisorEvents,
        metrics: Metrics,
        limits: WatchdogLimits | None = None,
        max_restarts: int = 3,
        size: int = 1,
    ) -> None:
        self._events = events
        self.slots = [WorkerSupervisor(spawn, self, metrics, limits, max_restarts) for _ in range(size)]

    # --- the pool as one worker --------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        states = {slot.state for slot in self.slots}
        for state in (WorkerState.READY, WorkerState.STARTING, WorkerState.STOPPED):
            if state in states:
                return state
        return WorkerState.FAILED

    @property
    def ready_info(self) -> WorkerReady | None:
        return next((slot.ready_info for slot in self.slots if slot.ready_info is not None), None)

    @property
    def failure(self) -> str | None:
        return next((slot.failure for slot in self.slots if slot.failure is not None), None)

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def stop(self) -> None:
        for slot in self.slots:
            slot.stop()

    def idle_slot(self) -> WorkerSupervisor | None:
        """A slot that can take a job now (it says which waiting job it would rather have)."""
        return next((slot for slot in self.slots if slot.idle), None)

    def cancel(self, record: JobRecord) -> None:
        for slot in self.slots:
            if slot.running is record:
                slot.cancel(record)

    async def finish(self, timeout: float) -> None:
        await asyncio.gather(*(slot.finish(timeout) for slot in self.slots))

    def abandon(self) -> None:
        for slot in self.slots:
            slot.abandon()

    # --- what the slots say, passed on -------------------------------------------------------------------

    def job_ended(
        self, record: JobRecord, result: JobSucceeded | Outcome, inference_seconds: float | None
    ) -> None:
        self._events.job_ended(record, result, inference_seconds)

    def worker_unavailable(self) -> None:
        if self.state is WorkerState.FAILED:
            self._events.worker_unavailable()

    def worker_idle(self) -> None:
        self._events.worker_idle()
