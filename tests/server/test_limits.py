"""Limits: queue length (429), start and run timeouts (504), body and prompt size."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import Harness, _harness, wait_completed

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


@pytest.fixture
def small_queue(tmp_path: Path) -> Iterator[Harness]:
    yield from _harness(tmp_path, hold=True, max_queue=2, run_timeout_seconds=0.3, max_body_bytes=4096)


def test_configured_maximum_queue(small_queue: Harness) -> None:
    for _ in range(3):  # one runs, two wait
        assert small_queue.client.post(SUBMIT, json=BODY).status_code == 200
    full = small_queue.client.post(SUBMIT, json=BODY)
    assert full.status_code == 429
    assert "queue is full" in full.json()["detail"]
    assert small_queue.client.post("/fal-ai/flux-2/lora", json=BODY).status_code == 429  # sync runs too


def test_client_max_queue_length(held: Harness) -> None:
    held.client.post(SUBMIT, json=BODY)
    held.client.post(SUBMIT, json=BODY)  # waits
    assert held.client.post(SUBMIT, params={"fal_max_queue_length": 1}, json=BODY).status_code == 429
    assert held.client.post(SUBMIT, params={"fal_max_queue_length": 2}, json=BODY).status_code == 200
    assert held.client.post(SUBMIT, params={"fal_max_queue_length": "x"}, json=BODY).status_code == 400


def test_request_that_cannot_start_in_time(held: Harness) -> None:
    held.client.post(SUBMIT, json=BODY)  # occupies the worker
    late = held.client.post(SUBMIT, json=BODY, headers={"X-Fal-Request-Timeout": "0.2"}).json()
    status = wait_completed(held, late["status_url"])
    assert status["error_type"] == "request_timeout"
    result = held.client.get(late["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert held.client.post(SUBMIT, json=BODY, headers={"X-Fal-Request-Timeout": "soon"}).status_code == 400


def test_a_started_request_is_not_timed_out_by_its_start_timeout(held: Harness) -> None:
    started = held.client.post(SUBMIT, json=BODY, headers={"X-Fal-Request-Timeout": "0.1"}).json()
    time.sleep(0.3)
    held.worker.release()
    assert held.client.get(started["response_url"]).status_code == 200


def test_run_timeout_stops_a_long_generation(small_queue: Harness) -> None:
    running = small_queue.client.post(SUBMIT, json=BODY).json()
    status = wait_completed(small_queue, running["status_url"])
    assert status["error_type"] == "generation_timeout"
    assert small_queue.client.get(running["response_url"]).status_code == 504


def test_body_size_cap(small_queue: Harness) -> None:
    big = {**BODY, "prompt": "x" * 5000}
    assert small_queue.client.post(SUBMIT, json=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    streamed = small_queue.client.post(SUBMIT, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_header_size_cap(harness: Harness) -> None:
    assert harness.client.get("/health", headers={"x-note": "a" * 1000}).status_code == 200
    response = harness.client.get("/health", headers={"x-note": "a" * 20_000})
    assert response.status_code == 431
    assert response.headers["x-fal-request-id"]


def test_prompt_length_cap(harness: Harness) -> None:
    response = harness.client.post("/fal-ai/flux-2/lora", json={**BODY, "prompt": "x" * 20_001})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "string_too_long"
