"""The worker supervisor's state machine: the states a worker goes through, and the ones it cannot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.messages import Job, JobSucceeded, WorkerReady, WorkerStartupFailed
from server.fetch.disk_cache import DiskCache
from server.jobs import IllegalTransition, JobRecord
from server.metrics import Metrics
from server.outcome import Outcome
from server.supervisor import WorkerState, WorkerSupervisor
from server.worker_process import Listener, WorkerExited


class Events:
    def __init__(self) -> None:
        self.ended: list[tuple[str, JobSucceeded | Outcome]] = []
        self.unavailable = 0

    def job_ended(
        self, record: JobRecord, result: JobSucceeded | Outcome, inference_seconds: float | None
    ) -> None:
        self.ended.append((record.request_id, result))

    def worker_unavailable(self) -> None:
        self.unavailable += 1

    def worker_idle(self) -> None:
        pass


class QuietWorker:
    """Says nothing by itself; the test speaks for it."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.starts = 0
        self.submitted: list[Job] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.starts += 1

    def submit(self, job: Job) -> None:
        self.submitted.append(job)

    def cancel(self, request_id: str) -> None:
        pass

    def prefers(self, job: Job) -> bool:
        return False

    def stop(self, timeout: float = 10.0) -> None:
        pass


READY = WorkerReady("stand-in", "cpu", "float32", 0.0)
Scenario = Callable[[WorkerSupervisor, QuietWorker, Events], None]


def run(scenario: Scenario, tmp_path: Path) -> None:
    """The scenario on the event loop, as the worker's messages arrive there, with a supervisor allowed
    two restarts."""

    async def main() -> None:
        workers: list[QuietWorker] = []
        events = Events()

        def spawn(listener: Listener) -> QuietWorker:
            workers.append(QuietWorker(listener))
            return workers[-1]

        supervisor = WorkerSupervisor(spawn, events, Metrics(DiskCache(tmp_path, 1)), max_restarts=2)
        supervisor.start()
        scenario(supervisor, workers[0], events)

    asyncio.run(main())


def test_start_ready_and_an_illegal_second_ready(tmp_path: Path) -> None:
    def scenario(supervisor: WorkerSupervisor, worker: QuietWorker, events: Events) -> None:
        assert supervisor.state is WorkerState.STARTING and worker.starts == 1
        worker.listener(READY)
        assert supervisor.state is WorkerState.READY and supervisor.idle
        with pytest.raises(IllegalTransition, match="ready -> ready"):
            worker.listener(READY)

    run(scenario, tmp_path)


def test_a_model_that_cannot_load_keeps_its_reason_after_the_process_exits(tmp_path: Path) -> None:
    def scenario(supervisor: WorkerSupervisor, worker: QuietWorker, events: Events) -> None:
        worker.listener(WorkerStartupFailed("OSError: no such folder"))
        worker.listener(WorkerExited(0))  # the child ends after saying why
        assert supervisor.state is WorkerState.FAILED and events.unavailable == 1
        assert supervisor.failure == "the model could not be loaded: OSError: no such folder"
        assert worker.starts == 1  # never restarted: the same model would fail again

    run(scenario, tmp_path)


def test_crashes_restart_the_worker_until_the_limit(tmp_path: Path) -> None:
    def scenario(supervisor: WorkerSupervisor, worker: QuietWorker, events: Events) -> None:
        for restart in (1, 2):
            worker.listener(READY)
            worker.listener(WorkerExited(-9))
            assert supervisor.state is WorkerState.STARTING and supervisor.restarts == restart
        worker.listener(READY)
        worker.listener(WorkerExited(-9))
        assert supervisor.state is WorkerState.FAILED and worker.starts == 3
        assert "exit code -9" in (supervisor.failure or "")

    run(scenario, tmp_path)


def test_nothing_is_recorded_after_stop(tmp_path: Path) -> None:
    def scenario(supervisor: WorkerSupervisor, worker: QuietWorker, events: Events) -> None:
        worker.listener(READY)
        supervisor.stop()
        worker.listener(WorkerExited(0))
        assert supervisor.state is WorkerState.STOPPED and supervisor.restarts == 0
        with pytest.raises(IllegalTransition, match="stopped -> stopped"):
            supervisor._move_to(WorkerState.STOPPED)

    run(scenario, tmp_path)
