"""Several workers as one (scale-out's slots): jobs go to idle slots, a cancel reaches the slot that runs
the request, and the pool fails only when every slot has."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from pipeline.messages import GenerationParams, Job, JobStarted, ResolvedLora, WorkerStartupFailed
from server.fetch.disk_cache import DiskCache
from server.jobs import JobRecord
from server.metrics import Metrics
from server.supervisor import WorkerState
from server.worker_pool import WorkerPool
from server.worker_process import Listener
from tests.server.test_supervisor import READY, Events, QuietWorker

PARAMS = GenerationParams("a fox", 512, 512, 4, 2.5, seed=1)


class CancelledWorker(QuietWorker):
    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self.cancelled: list[str] = []

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def run(scenario: Callable[[WorkerPool, list[CancelledWorker], Events], None], tmp_path: Path) -> None:
    async def main() -> None:
        workers: list[CancelledWorker] = []
        events = Events()

        def spawn(listener: Listener) -> CancelledWorker:
            workers.append(CancelledWorker(listener))
            return workers[-1]

        pool = WorkerPool(spawn, events, Metrics(DiskCache(tmp_path, 1)), max_restarts=0, size=2)
        pool.start()
        scenario(pool, workers, events)

    asyncio.run(main())


def record(request_id: str) -> JobRecord:
    return JobRecord(request_id, "fal-ai/flux-2", {}, "http://testserver/", params=PARAMS)


def test_jobs_go_to_idle_slots_and_a_cancel_to_the_one_running_it(tmp_path: Path) -> None:
    def scenario(pool: WorkerPool, workers: list[CancelledWorker], events: Events) -> None:
        assert pool.state is WorkerState.STARTING and pool.idle_slot() is None
        workers[1].listener(READY)
        assert pool.state is WorkerState.READY and pool.idle_slot() is pool.slots[1]
        first, second = record("a"), record("b")
        assert pool.idle_slot() is pool.slots[1]
        pool.slots[1].run(first)
        assert [job.request_id for job in workers[1].submitted] == ["a"] and pool.idle_slot() is None
        workers[0].listener(READY)
        assert pool.idle_slot() is pool.slots[0]
        pool.slots[0].run(second)
        assert [job.request_id for job in workers[0].submitted] == ["b"] and all(
            slot.running for slot in pool.slots
        )
        assert pool.idle_slot() is None
        workers[0].listener(JobStarted("b", "replica x"))
        assert second.logs[-1].message == "generation started on replica x"
        pool.cancel(second)
        assert workers[0].cancelled == ["b"] and workers[1].cancelled == []

    run(scenario, tmp_path)


def test_the_pool_serves_while_one_slot_has_failed(tmp_path: Path) -> None:
    def scenario(pool: WorkerPool, workers: list[CancelledWorker], events: Events) -> None:
        workers[0].listener(WorkerStartupFailed("no replica answered"))
        assert pool.state is WorkerState.STARTING and events.unavailable == 0
        workers[1].listener(READY)
        assert pool.state is WorkerState.READY and pool.idle_slot() is not None and events.unavailable == 0

    run(scenario, tmp_path)


def test_the_pool_fails_once_every_slot_has(tmp_path: Path) -> None:
    def scenario(pool: WorkerPool, workers: list[CancelledWorker], events: Events) -> None:
        for worker in workers:
            worker.listener(WorkerStartupFailed("no replica answered"))
        assert pool.state is WorkerState.FAILED and events.unavailable == 1
        assert pool.failure == "the model could not be loaded: no replica answered"

    run(scenario, tmp_path)


def test_a_lora_set_is_its_files_and_scales_in_any_order() -> None:
    style, detail = ResolvedLora("/a", "aa" * 32, 0.8, "x"), ResolvedLora("/b", "bb" * 32, 1.0, "y")
    moved = ResolvedLora("/elsewhere", "aa" * 32, 0.8, "https://example.com/style.safetensors")
    assert Job("1", PARAMS, (style, detail)).lora_set == Job("2", PARAMS, (detail, moved)).lora_set
    rescaled = ResolvedLora("/a", "aa" * 32, 0.7, "x")
    assert Job("1", PARAMS, (style,)).lora_set != Job("1", PARAMS, (rescaled,)).lora_set
    assert Job("1", PARAMS).lora_set == "no-loras" != Job("1", PARAMS, (style,)).lora_set


def test_lora_placement_knows_which_free_replica_holds_a_set() -> None:
    from server.scaleout.remote_worker import LoraPlacement

    placement = LoraPlacement(per_replica=2)
    for lora_set in ("a", "b", "a", "c"):
        placement.started("replica 1", lora_set, reserved="")
    assert not placement.free_replica_holds("a")  # replica 1 holds it, but is busy
    placement.finished("replica 1")
    assert [placement.free_replica_holds(s) for s in "abc"] == [True, False, True]  # b: least recent
    assert placement.reserve("a") == "replica 1"  # sent there: busy before it says it started
    assert not placement.free_replica_holds("c") and placement.reserve("c") == ""
    placement.started("replica 2", "a", reserved="replica 1")  # Ray chose another: the first is free
    assert placement.free_replica_holds("c") and not placement.free_replica_holds("b")
