"""Stored files: each kept with its owner in the store, served to that owner after a restart too, and a
request whose images cannot be written still completes."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.server.conftest import _harness

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}
ALPHA, BETA = {"Authorization": "Key alpha-key"}, {"Authorization": "Key beta-key"}


def test_a_sync_runs_files_outlive_a_restart_for_their_owner_only(tmp_path: Path) -> None:
    keys = {"api_keys": ("alpha-key", "beta-key")}
    first = _harness(tmp_path, hold=False, **keys)
    h = next(first)
    image_url = h.client.post("/fal-ai/flux-2/lora", json=BODY, headers=ALPHA).json()["images"][0]["url"]
    first.close()

    second = _harness(tmp_path, hold=False, **keys)
    h = next(second)
    try:
        served = h.client.get(image_url, headers=ALPHA)
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert h.client.get(image_url, headers=BETA).status_code == 404
    finally:
        second.close()


def test_images_that_cannot_be_written_fail_their_request_and_the_queue_goes_on(tmp_path: Path) -> None:
    gen = _harness(tmp_path, hold=True)
    h = next(gen)
    try:
        files = tmp_path / "data" / "files"
        first = h.client.post("/queue/fal-ai/flux-2/lora", json=BODY).json()
        second = h.client.post("/queue/fal-ai/flux-2/lora", json=BODY).json()
        shutil.rmtree(files)
        files.write_text("not a folder any more")  # every write into it fails
        h.worker.release()
        result = h.client.get(first["response_url"])
        assert result.status_code == 503
        assert result.json()["error_type"] == "storage_unavailable"
        assert "could not be stored" in result.json()["detail"]
        files.unlink()
        files.mkdir()
        assert [job.request_id for job in h.worker.submitted][-1] == second["request_id"]  # it moved on
        h.worker.release()
        assert h.client.get(second["response_url"]).status_code == 200
    finally:
        gen.close()
