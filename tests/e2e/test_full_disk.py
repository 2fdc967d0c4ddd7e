"""A real full disk: the data folder on a small filesystem, filled up while the server runs. Requests get
a clear 507, the server keeps answering, nothing stored is damaged, and it works again once space returns.
Mounting the filesystem needs root (CI runs as root); elsewhere the test is skipped, and
tests/server/test_full_disk.py covers the same answers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.testing import LiveServer

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write until the filesystem is full; returns the file that takes the space."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            pass
    return filler


def outcome(server: LiveServer, submit: httpx.Response) -> httpx.Response:
    """The queue request's result, or the submit itself when it was refused."""
    if submit.status_code != 200:
        return submit
    status_url = submit.json()["status_url"]
    deadline = time.monotonic() + 60
    while httpx.get(status_url).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return httpx.get(submit.json()["response_url"])


def test_a_full_disk_answers_507_and_recovers(small_disk: Path, cache_dir: Path) -> None:
    data = small_disk / "data"
    env = {"FLUX2_CACHE_DIR": str(cache_dir)}
    with LiveServer(data, "--model", "tiny", env=env) as server:
        queue = f"{server.url}/queue/fal-ai/flux-2/lora"
        before = outcome(server, httpx.post(queue, json=BODY)).json()
        image = httpx.get(before["images"][0]["url"]).content

        filler = fill(small_disk)
        for attempt in (
            httpx.post(queue, json=BODY),
            httpx.post(f"{server.url}/fal-ai/flux-2", json=BODY, timeout=60),
        ):
            answer = outcome(server, attempt)
            assert answer.status_code == 507, answer.text
            assert answer.json()["error_type"] == "insufficient_storage"
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/ready").status_code == 200

        filler.unlink()  # space is back
        assert outcome(server, httpx.post(queue, json=BODY)).status_code == 200
        assert httpx.get(before["images"][0]["url"]).content == image
    assert "Traceback" not in server.log()

    with LiveServer(data, "--model", "tiny", env=env) as again:  # the store survived intact
        assert (
            httpx.get(before["images"][0]["url"].replace(str(server.port), str(again.port))).content == image
        )
