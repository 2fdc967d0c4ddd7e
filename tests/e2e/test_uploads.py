"""The real `fal_client` uploads to the live server (`upload_file`, `upload_image`, and its storage
fallback), then edits with the uploaded file's URL; the README's way of pointing it here."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import fal_client
import fal_client.client
import httpx
import numpy as np
import pytest
from PIL import Image

from server.testing import LiveServer


@pytest.fixture
def uploads(
    fal: fal_client.SyncClient, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[fal_client.SyncClient]:
    """fal_client with its two storage base URLs pointed here too, as the README says."""
    monkeypatch.setattr(fal_client.client, "REST_URL", live_server.url)
    monkeypatch.setattr(fal_client.client, "CDN_URL", live_server.url)
    yield fal_client.SyncClient()


def picture(width: int = 200, height: int = 150) -> Image.Image:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    return Image.fromarray(gradient)


def test_upload_file_then_edit_with_its_url(
    uploads: fal_client.SyncClient, live_server: LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "photo.png"
    picture().save(path)
    url = uploads.upload_file(path)
    assert url.startswith(f"{live_server.url}/files/") and url.endswith(".png")
    served = httpx.get(url)
    assert served.content == path.read_bytes() and served.headers["content-type"] == "image/png"

    result = uploads.subscribe(
        "fal-ai/flux-2/lora/edit",
        {"prompt": "make it blue", "image_urls": [url], "num_inference_steps": 4, "seed": 3},
    )
    (image,) = result["images"]
    assert (image["width"], image["height"]) == (192, 144)  # the upload's size, floored to 16


def test_upload_image_and_the_storage_fallback(
    uploads: fal_client.SyncClient, live_server: LiveServer
) -> None:
    url = uploads.upload_image(picture(), format="jpeg")
    assert url.startswith(f"{live_server.url}/files/") and url.endswith(".jpeg")
    stored = Image.open(io.BytesIO(httpx.get(url).content))
    assert stored.format == "JPEG" and stored.size == (200, 150)
    # The client's other repository: initiate, then PUT the bytes to the URL it was given.
    other = uploads.upload(b"GIF89a not really", "image/gif", repository="fal")
    assert other.startswith(f"{live_server.url}/files/") and httpx.get(other).content == b"GIF89a not really"


def test_an_upload_of_another_type_is_never_served_as_it(uploads: fal_client.SyncClient) -> None:
    url = uploads.upload(b"<script>alert(1)</script>", "text/html", file_name="x.html")
    assert url.endswith(".bin")
    served = httpx.get(url)
    assert served.headers["content-type"] == "application/octet-stream"
    assert served.headers["x-content-type-options"] == "nosniff"
