"""A full disk: a request whose images or record cannot be written fails with a clear 507, the server
keeps answering, what is stored stays intact, and it works again once space returns."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from server.files import FileStore
from tests.server.conftest import Harness, _harness

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    yield from _harness(tmp_path, hold=False)


def test_images_on_a_full_disk_fail_their_request_with_507(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = h.client.post(SUBMIT, json=BODY).json()

    def no_space(self: FileStore, name: str, data: bytes, owner: str | None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(FileStore, "_save", no_space)
        full = h.client.post(SUBMIT, json=BODY).json()
        result = h.client.get(full["response_url"])
        assert result.status_code == 507
        assert result.json() == {
            "detail": "the images could not be stored: the server's disk is full",
            "error_type": "insufficient_storage",
        }
        assert h.client.get("/health").status_code == 200
    after = h.client.post(SUBMIT, json=BODY).json()  # space is back
    assert h.client.get(after["response_url"]).status_code == 200
    image = h.client.get(before["response_url"]).json()["images"][0]["url"]
    assert h.client.get(image).status_code == 200  # what was stored before is intact


def test_a_full_job_store_refuses_new_requests_with_507_and_recovers(h: Harness) -> None:
    """SQLite's own "database or disk is full", made real by capping the store's pages."""
    kept = h.client.post(SUBMIT, json=BODY).json()
    engine = h.services.scheduler.store._database.engine  # type: ignore[union-attr]

    def capped(connection: Any, record: Any) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()
    sa.event.listen(engine, "connect", capped)
    big = {**BODY, "prompt": "x" * 19_000}  # a record larger than the room left in the last page
    refused = h.client.post(SUBMIT, json=big)
    assert refused.status_code == 507
    assert refused.json()["error_type"] == "insufficient_storage"
    assert "the request could not be stored" in refused.json()["detail"]
    assert h.client.get("/health").status_code == 200
    sa.event.remove(engine, "connect", capped)
    engine.dispose()
    accepted = h.client.post(SUBMIT, json=big)  # space is back
    assert accepted.status_code == 200
    assert h.client.get(accepted.json()["response_url"]).status_code == 200
    assert h.client.get(kept["response_url"]).status_code == 200


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage"),
        (PermissionError(errno.EACCES, "Permission denied"), 503, "storage_unavailable"),
    ],
)
def test_an_upload_that_cannot_be_stored_says_why(
    h: Harness, monkeypatch: pytest.MonkeyPatch, error: OSError, status: int, error_type: str
) -> None:
    """A full disk is 507 (it passes when space returns); any other failure to write is 503, not a claim
    that the disk is full."""

    def fail(self: FileStore, name: str, data: bytes, owner: str | None) -> None:
        raise error

    with monkeypatch.context() as patched:
        patched.setattr(FileStore, "_save", fail)
        refused = h.client.post(
            "/files/upload", content=b"\x89PNG\r\n\x1a\n", headers={"Content-Type": "image/png"}
        )
    assert refused.status_code == status and refused.json()["error_type"] == error_type
    assert refused.json()["detail"].startswith("the upload could not be stored")
    stored = h.client.post(
        "/files/upload", content=b"\x89PNG\r\n\x1a\n", headers={"Content-Type": "image/png"}
    )
    assert stored.status_code == 200
