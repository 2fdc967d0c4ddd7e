"""The queue's order: priorities, first come first served, and a worker's reach for a request it holds the
LoRAs of, bounded so the head always starts in the end."""

from __future__ import annotations

from pipeline.messages import GenerationParams
from server.jobs import JobRecord, Priority
from server.request_queue import LOOK_AHEAD, RequestQueue

PARAMS = GenerationParams("a fox", 512, 512, 4, 2.5, seed=1)


def queued(
    *names: str, priority: Priority = Priority.NORMAL, queue: RequestQueue | None = None
) -> RequestQueue:
    queue = queue or RequestQueue()
    for name in names:
        queue.push(
            JobRecord(name, "fal-ai/flux-2", {}, "http://testserver/", params=PARAMS, priority=priority)
        )
    return queue


def popped(queue: RequestQueue, prefer: str | None = None) -> str | None:
    record = queue.pop(None if prefer is None else lambda r: r.request_id == prefer)
    return record.request_id if record else None


def test_first_come_first_served_normal_before_low() -> None:
    queue = queued("low", priority=Priority.LOW)
    queued("a", "b", queue=queue)
    assert [popped(queue) for _ in range(4)] == ["a", "b", "low", None]


def test_a_worker_takes_the_request_it_prefers_within_reach_and_the_rest_keep_their_order() -> None:
    names = [f"r{i}" for i in range(LOOK_AHEAD + 2)]
    queue = queued(*names)
    assert popped(queue, prefer="r3") == "r3"
    assert popped(queue, prefer=names[LOOK_AHEAD + 1]) == "r0"  # out of reach: the head
    assert [popped(queue) for _ in range(3)] == ["r1", "r2", "r4"]


def test_preference_stays_inside_the_first_waiting_priority() -> None:
    queue = queued("low", priority=Priority.LOW)
    queued("a", queue=queue)
    assert popped(queue, prefer="low") == "a"


def test_the_head_is_passed_over_a_bounded_number_of_times() -> None:
    queue = queued("head", *(f"r{i}" for i in range(LOOK_AHEAD + 1)))
    for i in range(LOOK_AHEAD):
        assert popped(queue, prefer=f"r{i}") == f"r{i}"
    assert popped(queue, prefer=f"r{LOOK_AHEAD}") == "head"
