"""Uploads under API keys: only the owner reads (or edits with) an upload, upload URLs are single use
(and taken by any server on the same store), and the upload size cap holds on both upload routes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.server.conftest import Harness, _harness

ALPHA, BETA = {"Authorization": "Key alpha-key"}, {"Authorization": "Key beta-key"}


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Harness]:
    yield from _harness(tmp_path, hold=False, api_keys=("alpha-key", "beta-key"), upload_max_bytes=100_000)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_are_their_owners_only(keyed: Harness) -> None:
    client = keyed.client
    token = client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=ALPHA).json()
    assert token["token_type"] == "Key" and token["base_url"] == "http://testserver"
    headers = {"Authorization": f"{token['token_type']} {token['token']}", "Content-Type": "image/png"}
    url = client.post("/files/upload", content=png(), headers=headers).json()["access_url"]
    path = url.removeprefix("http://testserver")
    assert client.get(path, headers=ALPHA).content == png()
    assert client.get(path, headers=BETA).status_code == 404
    assert (
        client.post("/files/upload", content=png(), headers={"Content-Type": "image/png"}).status_code == 401
    )

    edit = {"prompt": "x", "num_inference_steps": 4, "image_urls": [url]}
    assert client.post("/fal-ai/flux-2/edit", json=edit, headers=ALPHA).status_code == 200
    refused = client.post("/fal-ai/flux-2/edit", json=edit, headers=BETA)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image_urls", 0]


def test_an_upload_url_is_single_use_and_keeps_its_owner(keyed: Harness) -> None:
    client = keyed.client
    started = client.post(
        "/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "image/png", "file_name": "a.png"},
        headers=BETA,
    ).json()
    upload_path = started["upload_url"].removeprefix("http://testserver")
    assert client.put(upload_path, content=png()).status_code == 200  # no key: the URL is the authority
    assert client.put(upload_path, content=png()).status_code == 404
    file_path = started["file_url"].removeprefix("http://testserver")
    assert client.get(file_path, headers=BETA).content == png()
    assert client.get(file_path, headers=ALPHA).status_code == 404
    assert client.put("/storage/upload/made-up", content=png()).status_code == 404


def test_an_upload_url_is_taken_by_another_server_on_the_same_store(tmp_path: Path) -> None:
    """As two ingress replicas of a scaled-out server are: the PUT may reach either."""
    first = _harness(tmp_path, hold=False, api_keys=("alpha-key",))
    second = _harness(tmp_path, hold=False, api_keys=("alpha-key",))
    one, other = next(first), next(second)
    try:
        started = one.client.post(
            "/storage/upload/initiate", json={"content_type": "image/png"}, headers=ALPHA
        ).json()
        upload_path = started["upload_url"].removeprefix("http://testserver")
        assert other.client.put(upload_path, content=png()).status_code == 200
        assert one.client.put(upload_path, content=png()).status_code == 404  # still single use
        file_path = started["file_url"].removeprefix("http://testserver")
        assert one.client.get(file_path, headers=ALPHA).content == png()
    finally:
        second.close()
        first.close()


def test_uploads_over_the_cap_are_413_and_empty_ones_400(keyed: Harness) -> None:
    client = keyed.client
    big = b"\0" * 100_001
    assert client.post("/files/upload", content=big, headers=ALPHA).status_code == 413
    started = client.post(
        "/storage/upload/initiate", json={"content_type": "image/png"}, headers=ALPHA
    ).json()
    upload_path = started["upload_url"].removeprefix("http://testserver")
    assert client.put(upload_path, content=big).status_code == 413
    assert client.post("/files/upload", content=b"", headers=ALPHA).status_code == 400
    assert client.post("/files/upload", content=b"\0" * 99_000, headers=ALPHA).status_code == 200


def test_a_100_mb_upload_is_refused_before_it_is_read(harness: Harness) -> None:
    huge = b"\0" * (100 * 1024**2)
    assert harness.client.post("/files/upload", content=huge).status_code == 413  # over the 64 MiB default
    assert harness.client.get("/health").status_code == 200
