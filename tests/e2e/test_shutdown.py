"""Stopping the server with two signals: the second stops at once, without waiting for the running
generation, and still loses nothing. (A single SIGTERM is one of the faults of scripts/fault_stall.py,
run in tests/e2e/test_stall_faults.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from server.jobs import JobStatus
from server.testing import LiveServer, stored_statuses

LONG = {"prompt": "a lighthouse", "image_size": "square_hd", "num_inference_steps": 50}  # ~5 s on tiny
SHORT = {"prompt": "a harbour", "image_size": "square", "num_inference_steps": 4}


def start_work(server: LiveServer) -> tuple[dict[str, str], list[dict[str, str]]]:
    """One long generation running (a step reported), two short ones queued behind it."""
    queue = f"{server.url}/queue/fal-ai/flux-2/lora"
    running = httpx.post(queue, json=LONG).json()
    waiting = [httpx.post(queue, json=SHORT).json() for _ in range(2)]
    deadline = time.monotonic() + 60
    while not any(
        entry["message"].startswith("step ")
        for entry in httpx.get(running["status_url"], params={"logs": 1}).json()["logs"] or []
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return running, waiting


def test_a_second_signal_stops_at_once_and_loses_nothing(tmp_path: Path, cache_dir: Path) -> None:
    env = {"FLUX2_CACHE_DIR": str(cache_dir), "FLUX2_SHUTDOWN_GRACE_SECONDS": "60"}
    data = tmp_path / "data"
    server = LiveServer(data, "--model", "tiny", env=env)
    with server:
        worker = httpx.get(f"{server.url}/ready").json()["worker_pid"]
        running, waiting = start_work(server)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        server.process.wait(20)
        assert time.monotonic() - stopped < 5  # not the rest of the generation, nor the 60 s grace
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}")  # the GPU is free for the next start
    assert "Traceback" not in server.log() and "leaked" not in server.log()
    assert stored_statuses(data, [a["request_id"] for a in (running, *waiting)]) == [
        JobStatus.IN_PROGRESS,  # cut short: it runs again
        JobStatus.IN_QUEUE,
        JobStatus.IN_QUEUE,
    ]

    with LiveServer(data, "--model", "tiny", env=env, port=server.port) as again:
        for accepted in (running, *waiting):
            deadline = time.monotonic() + 60
            while httpx.get(accepted["status_url"]).json()["status"] != "COMPLETED":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert httpx.get(accepted["response_url"]).status_code == 200
        assert "Traceback" not in again.log()
