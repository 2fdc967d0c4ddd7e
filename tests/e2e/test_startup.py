"""Starting the server: bad configuration stops it with a clear message; a model that cannot load is
reported on /ready and answered with 503s, while /health stays up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from server.testing import LiveServer, installed_command


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed command, run from a folder of its own (never the repository)."""
    return subprocess.run(
        [installed_command(), "serve", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_bad_models_yaml_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  tiny:\n    source: tiny\n    dtype: float64\n")
    run = serve("--config", str(config), "--model", "tiny", cwd=tmp_path)
    assert run.returncode == 2
    assert "models.tiny.tiny.dtype" in run.stderr


def test_unknown_model(tmp_path: Path) -> None:
    run = serve("--model", "flux3", cwd=tmp_path)
    assert run.returncode == 2
    assert "unknown model 'flux3'" in run.stderr


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        ("model", "no-such-folder"),
        ("safety checker", "no-such-folder"),
        ("memory", "does not fit this device"),
    ],
)
def test_model_or_checker_that_cannot_load(tmp_path: Path, cache_dir: Path, broken: str, says: str) -> None:
    """Any way, the server must not serve: never an image without a model, nor an unchecked one, nor a
    model that does not fit in memory."""
    missing = tmp_path / "no-such-folder"
    model = (
        f"source: hub\n    repo_id: x/y\n    local_dir: {missing}" if broken == "model" else "source: tiny"
    )
    checker = (
        f"{{source: hub, repo_id: x/y, local_dir: {missing}}}"
        if broken == "safety checker"
        else "{source: tiny}"
    )
    profiles = "    memory_profiles: {huge: {min_device_memory_gib: 1000000}}\n" if broken == "memory" else ""
    config = tmp_path / "models.yaml"
    config.write_text(
        f"models:\n  m:\n    {model}\n    dtype: float32\n    safety_checker: {checker}\n{profiles}"
    )
    server = LiveServer(
        tmp_path / "data", "--config", str(config), "--model", "m", env={"FLUX2_CACHE_DIR": str(cache_dir)}
    )
    try:
        ready = server.wait_for_ready_state(lambda answer: answer.json()["state"] == "failed")
        assert ready.status_code == 503
        assert "could not be loaded" in ready.json()["error"] and says in ready.json()["error"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        run = httpx.post(f"{server.url}/fal-ai/flux-2", json={"prompt": "p"}, timeout=30)
        assert run.status_code == 503
        assert run.json()["error_type"] == "runner_scheduling_failure"
    finally:
        server.stop()


def test_json_logs_carry_the_request_id(tmp_path: Path, cache_dir: Path) -> None:
    with LiveServer(
        tmp_path / "data", "--model", "tiny", "--log-json", env={"FLUX2_CACHE_DIR": str(cache_dir)}
    ) as server:
        response = httpx.post(
            f"{server.url}/fal-ai/flux-2", json={"prompt": "p", "image_size": "square"}, timeout=60
        )
        request_id = response.headers["x-fal-request-id"]
    # Every log record is one JSON line; other lines come from outside logging (multiprocessing's resource
    # tracker may print a warning at exit).
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    mine = [entry["message"] for entry in lines if entry.get("request_id") == request_id]
    assert mine[0].startswith("accepted") and mine[-1] == "completed: ok"
    assert {"MainProcess", "flux2-worker"} <= {entry["process"] for entry in lines}


def test_ready_describes_the_loaded_worker(live_server: LiveServer) -> None:
    body = httpx.get(f"{live_server.url}/ready").json()
    assert body["ready"] and (body["model"], body["device"], body["dtype"]) == ("tiny", "cpu", "float32")
    # A CPU server runs eager unless FLUX2_COMPILE=true: CPU compiles cost more than they save
    assert (body["compiled"], body["attention_backend"], body["memory_profile"]) == (False, "native", "full")
    assert (body["compile_seconds"], body["compiled_graphs_reused"]) == (0.0, 0)
    # What the worker holds, accounted (pipeline/memory.py; exactness is tested on the worker's side)
    memory = body["memory_bytes"]
    assert set(memory) == {
        "transformer",
        "text_encoder",
        "vae",
        "safety_checker",
        "lora_slots",
        "lora_device_cache",
        "prompt_cache",
    }
    assert memory["lora_slots"] > 0 and memory["lora_device_cache"] == 0  # no device tier on a CPU


def test_a_damaged_job_store_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite").write_bytes(b"this was never a database" * 100)
    run = serve("--model", "tiny", "--data-dir", str(data), cwd=tmp_path)
    assert run.returncode == 2
    assert f"the job store {data / 'jobs.sqlite'} cannot be opened" in run.stderr
    assert "move the file aside" in run.stderr and "Traceback" not in run.stderr


def test_a_locked_job_store_stops_the_start_saying_so(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    holder = sqlite3.connect(data / "jobs.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process, mid-write, never letting go
    try:
        run = serve("--model", "tiny", "--data-dir", str(data), cwd=tmp_path)
    finally:
        holder.close()
    assert run.returncode == 2
    assert "database is locked" in run.stderr and "another server running" in run.stderr
