"""The durable job store: round trips, restarts that lose nothing, and retention."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.messages import GenerationParams
from server.fetch.lora_fetcher import LoraRequest
from server.jobs import JobRecord, JobStatus, Priority
from server.outcome import Failure, failed
from server.store import SqliteJobStore
from tests.server.conftest import _harness

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def test_round_trip(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    params = GenerationParams("p", 512, 512, 4, 2.5, 2**64 - 1)
    loras = (LoraRequest("a/b", 0.5),)
    record = JobRecord(
        "r1", "fal-ai/flux-2/lora", {"prompt": "p"}, "http://h/", params=params, loras=loras, durable=True
    )
    record.priority = Priority.LOW
    record.log("hello")
    store.save(record)
    record.complete(failed(Failure.WORKER_LOST, "gone"), 1.5)
    store.save(record)
    store.close()

    (loaded,) = SqliteJobStore(tmp_path / "jobs.sqlite").load_all()
    assert loaded.params == params and loaded.loras == loras and loaded.priority is Priority.LOW
    assert loaded.status is JobStatus.COMPLETED and loaded.inference_seconds == 1.5
    assert loaded.outcome == record.outcome
    assert [entry.message for entry in loaded.logs] == ["hello"]


def test_restart_runs_what_was_queued_or_running_and_keeps_what_finished(tmp_path: Path) -> None:
    first = _harness(tmp_path, hold=True)
    h = next(first)
    done = h.client.post(SUBMIT, json=BODY).json()
    h.worker.release()
    running, queued = h.client.post(SUBMIT, json=BODY).json(), h.client.post(SUBMIT, json=BODY).json()
    invalid = h.client.post(SUBMIT, json={"prompt": ""}).json()
    first.close()  # the server goes away with one request running and one queued

    second = _harness(tmp_path, hold=False)
    h = next(second)
    try:
        for accepted in (running, queued):
            assert h.client.get(accepted["response_url"]).status_code == 200
        assert [job.request_id for job in h.worker.submitted] == [running["request_id"], queued["request_id"]]
        assert h.client.get(done["response_url"]).status_code == 200  # still readable
        assert h.client.get(invalid["response_url"]).status_code == 422
        logs = h.client.get(running["status_url"], params={"logs": 1}).json()["logs"]
        assert any("requeued after a server restart" in entry["message"] for entry in logs)
    finally:
        second.close()


def test_retention_forgets_old_results_and_their_files(tmp_path: Path) -> None:
    gen = _harness(tmp_path, hold=False, result_ttl_seconds=0.3)
    h = next(gen)
    try:
        accepted = h.client.post(SUBMIT, json=BODY).json()
        image = h.client.get(accepted["response_url"]).json()["images"][0]
        assert h.client.get(image["url"]).status_code == 200
        time.sleep(1.0)
        assert h.client.get(accepted["status_url"]).status_code == 404
        assert h.client.get(image["url"]).status_code == 404
        assert SqliteJobStore(tmp_path / "data" / "jobs.sqlite").load_all() == []
    finally:
        gen.close()


def test_a_store_from_before_webhook_pending_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    from server import store

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(store._SCHEMA.replace(",\n    webhook_pending INTEGER NOT NULL DEFAULT 0", ""))
    old.execute(
        "INSERT INTO jobs (request_id, app_id, request_input, base_url, priority, status, created_at, logs,"
        " webhook_url) VALUES ('r1', 'fal-ai/flux-2', '{}', 'http://h/', 0, 'COMPLETED', 1.0, '[]', NULL)"
    )
    old.commit()
    assert "webhook_pending" not in {row[1] for row in old.execute("PRAGMA table_info(jobs)")}
    old.close()
    (loaded,) = SqliteJobStore(path).load_all()
    assert loaded.request_id == "r1" and loaded.webhook_pending is False
