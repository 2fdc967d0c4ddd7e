"""A real worker process stopped by the operating system mid-generation (SIGSTOP) is found hung, killed and
replaced; its request is answered, and the request queued behind it runs on the new worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from server.testing import LiveServer

LONG = {"prompt": "a lighthouse", "image_size": "square_hd", "num_inference_steps": 50}
SHORT = {"prompt": "a harbour", "image_size": "square", "num_inference_steps": 4}


def wait_for(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("not in time")


def test_a_stopped_worker_is_replaced(tmp_path: Path, cache_dir: Path) -> None:
    env = {"FLUX2_CACHE_DIR": str(cache_dir), "FLUX2_HEARTBEAT_SECONDS": "3"}
    with LiveServer(tmp_path / "data", "--model", "tiny", env=env) as server:
        pid = httpx.get(f"{server.url}/ready").json()["worker_pid"]
        queue = f"{server.url}/queue/fal-ai/flux-2"
        hung = httpx.post(f"{queue}/lora", json=LONG).json()

        def stepping() -> bool:
            logs = httpx.get(hung["status_url"], params={"logs": 1}).json()["logs"] or []
            return any(entry["message"].startswith("step ") for entry in logs)

        wait_for(stepping, 60)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            waiting = httpx.post(f"{queue}/lora", json=SHORT).json()
            wait_for(lambda: httpx.get(hung["status_url"]).status_code == 200, 30)
            found = time.monotonic() - stopped_at
            result = httpx.get(hung["response_url"])
            assert (result.status_code, result.json()["error_type"]) == (503, "runner_disconnected")
            assert found < 15, found  # within the heartbeat interval (3 s) of its last step, plus a tick
            wait_for(lambda: httpx.get(waiting["status_url"]).status_code == 200, 120)
            assert httpx.get(waiting["response_url"]).status_code == 200
            ready = httpx.get(f"{server.url}/ready").json()
            assert ready["worker_restarts"] == 1 and ready["worker_pid"] not in (None, pid)
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)  # killed, and reaped
        finally:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
