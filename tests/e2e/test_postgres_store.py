"""The job store on PostgreSQL (FLUX2_DATABASE_URL): a real PostgreSQL from the machine's packages, a
live server, the requests there and not in the data folder, kept across a restart; and a database that
cannot be reached stops the start, saying so. (A PostgreSQL restart mid-run is survived by the scaled-out
server in test_scaleout.py, which shares one store between its processes.)"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from server.testing import LiveServer, PostgresServer, free_port, installed_command

SHORT = {"prompt": "a harbour", "image_size": "square", "num_inference_steps": 4}


def wait_completed(status_url: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(status_url).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_requests_live_in_postgresql_and_survive_a_restart(
    postgres: PostgresServer, tmp_path: Path, cache_dir: Path
) -> None:
    env = {"FLUX2_DATABASE_URL": postgres.database(), "FLUX2_CACHE_DIR": str(cache_dir)}
    data = tmp_path / "data"
    with LiveServer(data, "--model", "tiny", env=env) as server:
        queue = f"{server.url}/queue/fal-ai/flux-2/lora"
        done = httpx.post(queue, json=SHORT).json()
        wait_completed(done["status_url"])
        image = httpx.get(done["response_url"]).json()["images"][0]
        invalid = httpx.post(queue, json={"prompt": ""}).json()  # completed at once with its 422
    assert not (data / "jobs.sqlite").exists()  # the store is the database, not the data folder
    with LiveServer(data, "--model", "tiny", env=env, port=server.port) as again:
        assert httpx.get(done["status_url"]).json()["status"] == "COMPLETED"
        assert httpx.get(done["response_url"]).json()["images"][0] == image
        assert httpx.get(image["url"]).status_code == 200 and again.port == server.port
        assert httpx.get(invalid["response_url"]).status_code == 422


def test_an_unreachable_database_stops_the_start_without_showing_its_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://flux2:s3cret@127.0.0.1:{free_port()}/jobs"  # nothing listens there
    run = subprocess.run(
        [installed_command(), "serve", "--model", "tiny", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        env={**os.environ, "FLUX2_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "the job store postgresql+psycopg://flux2:***@127.0.0.1" in run.stderr
    assert "s3cret" not in run.stderr and "Traceback" not in run.stderr
