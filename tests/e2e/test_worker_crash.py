"""A real worker crash (SIGKILL of the GPU process mid-generation): only the request in hand fails, with a
503; the worker is restarted with the model and the queue goes on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from server.testing import LiveServer

SLOW = {"prompt": "a lighthouse", "image_size": "square_hd", "num_inference_steps": 50}
FAST = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def worker_pid(server: LiveServer) -> int:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    for pid in map(int, children):
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            return pid
    raise AssertionError(f"no worker process among {children}")


def test_killed_worker_fails_only_its_request(tmp_path: Path, cache_dir: Path) -> None:
    with LiveServer(tmp_path / "data", "--model", "tiny", env={"FLUX2_CACHE_DIR": str(cache_dir)}) as server:
        queue = f"{server.url}/queue/fal-ai/flux-2/lora"
        doomed = httpx.post(queue, json=SLOW).json()
        waiting = httpx.post(queue, json=FAST).json()
        while httpx.get(doomed["status_url"]).json()["status"] != "IN_PROGRESS":
            time.sleep(0.02)
        os.kill(worker_pid(server), signal.SIGKILL)
        while httpx.get(waiting["status_url"]).json()["status"] != "COMPLETED":
            time.sleep(0.1)
        crashed = httpx.get(doomed["response_url"])
        assert crashed.status_code == 503
        assert crashed.json()["error_type"] == "runner_disconnected"
        assert httpx.get(waiting["response_url"]).status_code == 200  # ran on the restarted worker
        ready = httpx.get(f"{server.url}/ready").json()
        assert ready["ready"] and ready["worker_restarts"] == 1
