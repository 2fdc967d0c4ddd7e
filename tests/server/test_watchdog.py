"""The watchdog: a worker that hangs (silent, deaf to its cancel, or stuck loading) is killed and
replaced, its request answered, and the queue goes on."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import Harness, _harness, wait_completed

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def watchdog_kills(h: Harness) -> dict[str, float]:
    families = text_string_to_metric_families(h.client.get("/metrics").text)
    return {
        sample.labels["reason"]: sample.value
        for family in families
        for sample in family.samples
        if sample.name == "flux2_worker_watchdog_kills_total"
    }


def test_a_silent_worker_is_killed_and_replaced_and_the_queue_goes_on(tmp_path: Path) -> None:
    gen = _harness(tmp_path, hold=True, heartbeat_seconds=0.3)
    h = next(gen)
    try:
        hung, waiting = h.client.post(SUBMIT, json=BODY).json(), h.client.post(SUBMIT, json=BODY).json()
        # Only the first goes silent: the one after the restart finishes at once, however slow this test
        # is to look (held too, it would be silent past 0.3 s as well on a loaded machine).
        h.worker.hold = False
        status = wait_completed(h, hung["status_url"])  # the stand-in said one step, then nothing
        assert status["error_type"] == "runner_disconnected"
        assert "sent nothing for 0.3 s" in status["error"]
        assert h.worker.kills == 1
        ready = h.client.get("/ready").json()
        assert ready["ready"] and ready["worker_restarts"] == 1  # a new worker took the queue
        assert h.worker.submitted[-1].request_id == waiting["request_id"]
        wait_completed(h, waiting["status_url"])
        assert h.client.get(waiting["response_url"]).status_code == 200
        assert watchdog_kills(h) == {"silent": 1.0}
    finally:
        gen.close()


def test_a_generation_deaf_to_its_cancel_is_killed_after_the_grace(tmp_path: Path) -> None:
    limits = {"run_timeout_seconds": 0.3, "cancel_grace_seconds": 0.3}
    gen = _harness(tmp_path, hold=True, worker={"hang": True}, **limits)
    h = next(gen)
    try:
        deaf = h.client.post(SUBMIT, json=BODY).json()
        status = wait_completed(h, deaf["status_url"])
        assert status["error_type"] == "generation_timeout"
        assert "did not stop within 0.3 s of being asked" in status["error"]
        assert h.client.get(deaf["response_url"]).status_code == 504
        assert h.worker.kills == 1 and watchdog_kills(h) == {"run_timeout": 1.0}
        logs = [
            entry["message"] for entry in h.client.get(deaf["status_url"], params={"logs": 1}).json()["logs"]
        ]
        assert "stopping: ran longer than 0.3 s" in logs  # it was asked first
    finally:
        gen.close()


def test_a_model_load_that_hangs_is_a_failed_start(tmp_path: Path) -> None:
    gen = _harness(tmp_path, hold=False, worker={"loads": False}, startup_timeout_seconds=0.3)
    h = next(gen)
    try:
        deadline = time.monotonic() + 5
        while h.client.get("/ready").json()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = h.client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["error"] == "the model did not load within 0.3 s"
        assert h.worker.kills == 1 and ready.json()["worker_restarts"] == 0  # the same load would hang again
        refused = h.client.post("/fal-ai/flux-2/lora", json=BODY)
        assert (refused.status_code, refused.json()["error_type"]) == (503, "runner_scheduling_failure")
    finally:
        gen.close()
