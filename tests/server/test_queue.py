"""The queue routes' wire behaviour, against a stand-in worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.messages import FailureKind, JobFailed, JobNote
from server.worker_process import WorkerExited
from tests.server.conftest import Harness

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def submit(h: Harness, body: dict[str, Any] | None = None, **headers: str) -> dict[str, Any]:
    response = h.client.post(SUBMIT, json=body or BODY, headers=headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    assert response.headers["x-fal-request-id"] == data["request_id"]
    return data


def test_submit_answers_with_absolute_urls(harness: Harness) -> None:
    data = submit(harness)
    rid = data["request_id"]
    base = f"http://testserver/queue/fal-ai/flux-2/requests/{rid}"
    assert data["status"] == "IN_QUEUE"
    assert (data["response_url"], data["status_url"], data["cancel_url"]) == (
        base,
        f"{base}/status",
        f"{base}/cancel",
    )
    assert isinstance(data["queue_position"], int)


def test_status_202_while_running_then_200(held: Harness) -> None:
    data = submit(held)
    running = held.client.get(data["status_url"])
    assert running.status_code == 202
    assert running.json()["status"] == "IN_PROGRESS"
    assert running.json()["logs"] is None  # only sent when asked for
    held.worker.release()
    done = held.client.get(data["status_url"], params={"logs": "1"})
    assert done.status_code == 200
    body = done.json()
    assert body["status"] == "COMPLETED" and "error" not in body
    assert body["metrics"]["inference_time"] > 0
    assert [entry["message"] for entry in body["logs"]][:2] == ["generation started", "step 1/4"]
    assert set(body["logs"][0]) == {"message", "level", "source", "timestamp"}


def test_what_the_worker_notes_reaches_the_requests_logs(held: Harness) -> None:
    submitted = held.client.post(SUBMIT, json=BODY).json()
    note = "LoRA 0 (x.safetensors): ignored 2 text-encoder keys (only the transformer is adapted)"
    held.worker.send(JobNote(submitted["request_id"], note))
    held.worker.release()
    logs = held.client.get(submitted["status_url"], params={"logs": 1}).json()["logs"]
    assert [entry["level"] for entry in logs if entry["message"] == note] == ["WARN"]


@pytest.mark.parametrize("flag", ["true", "1", "True", "yes"])
def test_logs_flag_spellings(held: Harness, flag: str) -> None:
    data = submit(held)
    assert isinstance(held.client.get(data["status_url"] + "/", params={"logs": flag}).json()["logs"], list)


def test_queue_positions_and_priorities(held: Harness) -> None:
    first = submit(held)  # runs at once
    low = submit(held, **{"X-Fal-Queue-Priority": "low"})
    normal = submit(held, **{"X-Fal-Queue-Priority": "normal"})
    assert held.client.get(first["status_url"]).json()["queue_position"] is None
    assert held.client.get(normal["status_url"]).json()["queue_position"] == 0
    assert held.client.get(low["status_url"]).json()["queue_position"] == 1
    held.worker.release()
    assert held.worker.submitted[-1].request_id == normal["request_id"]  # normal overtakes low
    assert held.client.get(low["status_url"]).json()["queue_position"] == 0


def test_result_before_completion_unknown_and_wrong_app(held: Harness) -> None:
    data = submit(held)
    assert held.client.get(data["response_url"]).status_code == 400
    unknown = held.client.get("/queue/fal-ai/flux-2/requests/nope")
    assert unknown.status_code == 404
    assert unknown.headers["x-fal-request-id"] == "nope"
    wrong_app = data["response_url"].replace("fal-ai/flux-2", "fal-ai/other")
    assert held.client.get(wrong_app).status_code == 404
    held.worker.release()
    assert held.client.get(data["response_url"]).status_code == 200


def test_validation_happens_after_acceptance(harness: Harness) -> None:
    data = submit(harness, {"prompt": "x", "num_inference_steps": 1000})
    status = harness.client.get(data["status_url"])
    assert status.status_code == 200
    assert status.json()["error_type"] == "validation_error"
    assert "num_inference_steps" in status.json()["error"]
    result = harness.client.get(data["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]
    assert not harness.worker.submitted


def test_cancel_queued_running_and_done(held: Harness) -> None:
    running, queued = submit(held), submit(held)
    cancel = held.client.put(queued["cancel_url"])
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    status = held.client.get(queued["status_url"]).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "request_cancelled"
    assert held.client.put(queued["cancel_url"]).status_code == 400  # already completed
    assert [job.request_id for job in held.worker.submitted] == [running["request_id"]]  # never ran

    assert held.client.put(running["cancel_url"]).status_code == 202
    assert held.client.get(running["status_url"]).json()["error_type"] == "request_cancelled"
    assert held.client.get(running["response_url"]).status_code == 400
    missing = held.client.put("/queue/fal-ai/flux-2/requests/nope/cancel")
    assert (missing.status_code, missing.json()) == (404, {"status": "NOT_FOUND"})


def test_status_stream_closes_after_completed(harness: Harness) -> None:
    data = submit(harness)
    with harness.client.stream("GET", data["status_url"] + "/stream", params={"logs": 1}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = stream.read().decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1]["status"] == "COMPLETED"
    # Each event carries only new entries (the JS client concatenates them): together, the full log once.
    streamed = [entry for event in events for entry in event["logs"]]
    assert streamed == harness.client.get(data["status_url"], params={"logs": 1}).json()["logs"]
    assert len(streamed) >= 2


def test_status_stream_pings_while_waiting(held: Harness) -> None:
    data = submit(held)
    lines: list[str] = []
    with held.client.stream("GET", data["status_url"] + "/stream") as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if line == ": ping":
                held.worker.release()
    assert ": ping" in lines
    assert json.loads(lines[-2][6:])["status"] == "COMPLETED"


def test_worker_crash_fails_only_the_request_in_hand(held: Harness) -> None:
    crashed, waiting = submit(held), submit(held)
    held.worker.send(WorkerExited(-9))  # as the process pump reports a dead child
    result = held.client.get(crashed["response_url"])
    assert result.status_code == 503
    assert result.json()["error_type"] == "runner_disconnected"
    assert held.client.get("/ready").json()["worker_restarts"] == 1
    held.worker.release()  # the restarted worker picks up the queue
    assert held.client.get(waiting["response_url"]).status_code == 200


def test_proxy_dispatches_on_target_url(harness: Harness) -> None:
    proxied = harness.client.post(
        "/api/fal/proxy", json=BODY, headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux-2/lora"}
    )
    assert proxied.status_code == 200
    status_url = proxied.json()["status_url"].replace("http://testserver", "https://queue.fal.run")
    status = harness.client.get(
        "/api/fal/proxy", headers={"x-fal-target-url": status_url.replace("/queue/", "/")}
    )
    assert status.json()["status"] == "COMPLETED"
    sync = harness.client.post(
        "/api/fal/proxy/", json=BODY, headers={"x-fal-target-url": "https://fal.run/fal-ai/flux-2"}
    )
    assert sync.status_code == 200 and sync.json()["images"]


@pytest.mark.parametrize(
    "target", [None, "https://evil.example/fal-ai/flux-2", "https://api.fal.ai/v1/models"]
)
def test_proxy_refuses_other_targets(harness: Harness, target: str | None) -> None:
    headers = {"x-fal-target-url": target} if target else {}
    response = harness.client.post("/api/fal/proxy", json=BODY, headers=headers)
    assert response.status_code == 400
    assert "detail" in response.json()
    assert response.headers["x-fal-request-id"]


def test_every_response_has_a_request_id(harness: Harness) -> None:
    for path in ("/health", "/ready", "/docs", "/openapi.json", "/files/nothing.png", "/no/such/route"):
        assert harness.client.get(path).headers["x-fal-request-id"], path


def test_files_are_served_and_names_are_checked(harness: Harness) -> None:
    output = harness.client.post("/fal-ai/flux-2/lora", json=BODY).json()
    image = output["images"][0]
    download = harness.client.get(image["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert len(download.content) == image["file_size"]
    for bad in ("../../etc/passwd", "..%2F..%2Fsecret.png", "x.png"):
        assert harness.client.get(f"/files/{bad}").status_code == 404


def test_sync_mode_inlines_images_and_keeps_no_file(harness: Harness, tmp_path: Any) -> None:
    output = harness.client.post("/fal-ai/flux-2/lora", json={**BODY, "sync_mode": True}).json()
    assert output["images"][0]["url"].startswith("data:image/png;base64,")
    assert not any((tmp_path / "data" / "files").iterdir())


def test_openapi_documents_the_input(harness: Harness) -> None:
    spec = harness.client.get("/openapi.json").json()
    body = spec["paths"]["/fal-ai/flux-2/lora"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body == {"$ref": "#/components/schemas/Flux2LoraInput"}
    assert (
        spec["components"]["schemas"]["Flux2LoraInput"]["properties"]["num_inference_steps"]["maximum"] == 50
    )


def test_out_of_memory_is_a_503_and_the_queue_goes_on(held: Harness) -> None:
    oom, waiting = submit(held), submit(held)
    held.worker.send(JobFailed(oom["request_id"], FailureKind.OUT_OF_MEMORY, "out of device memory: 2 GiB"))
    result = held.client.get(oom["response_url"])
    assert result.status_code == 503
    assert result.json() == {"detail": "out of device memory: 2 GiB", "error_type": "out_of_memory"}
    assert result.headers["x-fal-error-type"] == "out_of_memory"
    held.worker.release()
    assert held.client.get(waiting["response_url"]).status_code == 200
