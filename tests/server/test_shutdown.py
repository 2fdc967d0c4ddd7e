"""Draining for a shutdown: new requests are refused, the running one finishes, the queue waits."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.server.conftest import Harness

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def test_draining_refuses_new_requests_and_starts_no_more_jobs(held: Harness) -> None:
    running, waiting = held.client.post(SUBMIT, json=BODY).json(), held.client.post(SUBMIT, json=BODY).json()
    assert held.client.portal is not None
    held.client.portal.call(held.services.scheduler.begin_shutdown)
    for route in (SUBMIT, "/fal-ai/flux-2/lora"):
        refused = held.client.post(route, json=BODY)
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        assert refused.headers["x-fal-error-type"] == "runner_scheduling_failure"
    held.worker.release()
    assert held.client.get(running["response_url"]).status_code == 200  # the running one finished
    assert [job.request_id for job in held.worker.submitted] == [running["request_id"]]
    assert held.client.get(waiting["status_url"]).json()["status"] == "IN_QUEUE"  # kept for the next start


def test_a_sync_run_still_waiting_at_a_shutdown_is_answered_503(held: Harness) -> None:
    held.client.post(SUBMIT, json=BODY)  # runs, held: the sync run below waits behind it
    with ThreadPoolExecutor(1) as pool:
        sync = pool.submit(held.client.post, "/fal-ai/flux-2/lora", json=BODY)
        deadline = time.monotonic() + 5
        while held.services.scheduler.waiting == 0:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert held.client.portal is not None
        held.client.portal.call(held.services.scheduler.begin_shutdown)  # type: ignore[union-attr]
        answer = sync.result(timeout=5)
    assert answer.status_code == 503 and "shutting down" in answer.json()["detail"]
    held.worker.release()
    assert len(held.worker.submitted) == 1  # it never ran
