"""The edit routes' HTTP side: references fetched, decoded and handed over as files that go when the
request is done; the reference limit; the edit routes' larger body cap; and only the caller's own files."""

from __future__ import annotations

import base64
import io
import random
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.server.conftest import Harness, _harness, wait_completed
from tests.server.fetch.lora_server import LoraServer, Route

MiB = 1024**2


def data_uri(width: int, height: int, fmt: str = "PNG", noisy: bool = False) -> str:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    if noisy:  # incompressible, for bodies of a known size
        image = Image.frombytes("RGB", (width, height), _noise(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _noise(n: int) -> bytes:
    return random.Random(0).randbytes(n)


def edit(**fields: object) -> dict[str, object]:
    return {"prompt": "make it blue", "num_inference_steps": 4, **fields}


@pytest.fixture
def small_refs(tmp_path: Path) -> Iterator[Harness]:
    """References capped at 1 MiB each, so the edit body cap is 1 MiB + 4 x 4/3 MiB."""
    yield from _harness(tmp_path, hold=False, reference_image_max_bytes=MiB, allow_private_lora_urls=True)


def test_references_reach_the_worker_decoded_and_scaled_and_go_when_done(
    small_refs: Harness, lora_server: LoraServer
) -> None:
    big = Image.new("RGB", (1500, 1000), (10, 200, 10))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    url = lora_server.serve("/big.jpg", Route(buffer.getvalue()))
    response = small_refs.client.post(
        "/fal-ai/flux-2/lora/edit", json=edit(image_urls=[data_uri(100, 80, "WEBP"), url])
    )
    assert response.status_code == 200, response.text
    (job,) = small_refs.worker.submitted
    assert [Path(file).suffix for file in job.images] == [".ppm", ".ppm"]
    # The output takes the first reference's size, floored to multiples of 16 (the stand-in's rule).
    assert (response.json()["images"][0]["width"], response.json()["images"][0]["height"]) == (96, 80)
    files_dir = small_refs.services.settings.files_dir
    assert all(Path(file).parent == files_dir for file in job.images)
    deadline = time.monotonic() + 10  # deleted in the background once the request is done
    while any(Path(file).exists() for file in job.images) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(Path(file).exists() for file in job.images)
    assert lora_server.hits["/big.jpg"] == 1


def test_the_worker_gets_at_most_a_megapixel(held: Harness) -> None:
    held.client.post("/queue/fal-ai/flux-2/edit", json=edit(image_urls=[data_uri(2000, 1500, "JPEG")]))
    deadline = time.monotonic() + 30
    while not held.worker.submitted and time.monotonic() < deadline:  # fetched and decoded in the stage
        time.sleep(0.02)
    (job,) = held.worker.submitted
    with Image.open(job.images[0]) as stored:
        assert stored.mode == "RGB" and stored.size == (1182, 886)  # sqrt(2^20 / 3 MP) scale, truncated
    held.worker.release()


def test_more_references_than_allowed_is_a_422(harness: Harness, tmp_path: Path) -> None:
    five = [data_uri(64, 64)] * 5
    response = harness.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=five))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_urls"] and error["type"] == "too_long"
    assert "FLUX2_MAX_REFERENCE_IMAGES" in error["msg"]
    eleven = [data_uri(64, 64)] * 11  # past what FLUX.2 takes at all: the schema's own bound
    response = harness.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=eleven))
    assert response.json()["detail"][0]["loc"] == ["body", "image_urls"]
    empty = harness.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[]))
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "image_urls"]
    missing = harness.client.post("/fal-ai/flux-2/edit", json=edit())
    assert missing.json()["detail"][0] == {**missing.json()["detail"][0], "type": "missing"}


def test_five_references_pass_when_the_setting_allows(tmp_path: Path) -> None:
    for h in _harness(tmp_path, hold=False, max_reference_images=5):
        response = h.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[data_uri(64, 64)] * 5))
        assert response.status_code == 200, response.text
        assert len(h.worker.submitted[0].images) == 5


def test_edit_routes_take_bodies_the_other_routes_refuse(small_refs: Harness) -> None:
    photo = data_uri(600, 500, "PNG", noisy=True)  # about 1.2 MiB as base64: over the usual 1 MiB
    assert 1.1 * MiB < len(photo) < 4 / 3 * MiB
    for path in ("/fal-ai/flux-2/edit", "/queue/fal-ai/flux-2/lora/edit"):
        response = small_refs.client.post(path, json=edit(image_urls=[photo]))
        assert response.status_code == 200, (path, response.text[:300])
    text_only = small_refs.client.post("/fal-ai/flux-2", json={**edit(), "padding": photo})
    assert text_only.status_code == 413
    seven_mib = small_refs.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[photo] * 6))
    assert seven_mib.status_code == 413  # over 1 MiB + 4 x 4/3 MiB


def test_a_reference_over_the_byte_cap_is_a_422(small_refs: Harness, lora_server: LoraServer) -> None:
    url = lora_server.serve("/huge.png", Route(b"\x89PNG" + b"\0" * (MiB + 10)))
    response = small_refs.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[url]))
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_urls", 0] and "over the 1 MiB limit" in error["msg"]


def test_own_file_urls_are_read_from_disk_for_their_owner_only(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("alpha-key\nbeta-key\n")
    alpha, beta = {"Authorization": "Key alpha-key"}, {"Authorization": "Key beta-key"}
    for h in _harness(tmp_path, hold=False, api_keys_file=keys_file):
        made = h.client.post(
            "/fal-ai/flux-2",
            json={"prompt": "x", "image_size": "square", "num_inference_steps": 4},
            headers=alpha,
        )
        url = made.json()["images"][0]["url"]
        assert url.startswith("http://testserver/files/")
        mine = h.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[url]), headers=alpha)
        assert mine.status_code == 200, mine.text
        assert mine.json()["images"][0]["width"] == 512  # the generated 512x512, read from disk
        theirs = h.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[url]), headers=beta)
        assert theirs.status_code == 422
        assert "no such file" in theirs.json()["detail"][0]["msg"]


def test_a_queued_edit_that_fails_to_fetch_completes_with_the_422(harness: Harness) -> None:
    submitted = harness.client.post(
        "/queue/fal-ai/flux-2/edit", json=edit(image_urls=["data:image/png;base64,AAAA"])
    ).json()
    status = wait_completed(harness, submitted["status_url"])
    assert status["error_type"] == "value_error"
    result = harness.client.get(submitted["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "image_urls", 0]


def test_a_queued_edit_survives_a_restart_and_fetches_its_references_again(tmp_path: Path) -> None:
    first = _harness(tmp_path, hold=True)
    h = next(first)
    h.client.post("/queue/fal-ai/flux-2", json={"prompt": "ahead", "num_inference_steps": 4})
    queued = h.client.post("/queue/fal-ai/flux-2/edit", json=edit(image_urls=[data_uri(160, 96)])).json()
    first.close()  # the server goes away with the edit still queued (fetched, not started)

    for h in _harness(tmp_path, hold=False):
        result = h.client.get(queued["response_url"])
        assert result.status_code == 200, result.text
        assert (result.json()["images"][0]["width"], result.json()["images"][0]["height"]) == (160, 96)
        (job,) = [job for job in h.worker.submitted if job.request_id == queued["request_id"]]
        assert len(job.images) == 1


def test_a_reference_that_drips_is_a_422_and_holds_nothing_else(
    tmp_path: Path, lora_server: LoraServer
) -> None:
    slow = lora_server.serve("/slow.png", Route(b"\x89PNG" + b"\0" * 4000, drip=0.05))
    settings = {"allow_private_lora_urls": True, "download_rate_window_seconds": 0.5}
    for h in _harness(tmp_path, hold=False, download_min_bytes_per_second=1000, **settings):
        submitted = h.client.post("/queue/fal-ai/flux-2/edit", json=edit(image_urls=[slow])).json()
        other = h.client.post("/fal-ai/flux-2", json={"prompt": "meanwhile", "num_inference_steps": 4})
        assert other.status_code == 200  # the GPU's queue is not held by the download
        wait_completed(h, submitted["status_url"], timeout=10)
        (error,) = h.client.get(submitted["response_url"]).json()["detail"]
        assert error["loc"] == ["body", "image_urls", 0] and "under the minimum" in error["msg"]


def _bomb(side: int) -> str:
    """A PNG claiming side x side pixels in a few bytes: a decompression bomb's header, as a data: URI."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("http://127.0.0.1:9/x.png", "non-public address 127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "non-public address 169.254.169.254"),
        ("file:///etc/passwd", "must be an https:// or http:// URL"),
        (_bomb(30_000), "over the 64.0 megapixels limit"),
    ],
)
def test_hostile_references_are_422s_and_the_server_goes_on(
    harness: Harness, reference: str, says: str
) -> None:
    response = harness.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[reference]))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_urls", 0] and says in error["msg"], error["msg"]
    assert (
        harness.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[data_uri(64, 64)])).status_code
        == 200
    )


def test_an_empty_download_is_a_422(small_refs: Harness, lora_server: LoraServer) -> None:
    url = lora_server.serve("/empty.png", Route(b""))
    (error,) = small_refs.client.post("/fal-ai/flux-2/edit", json=edit(image_urls=[url])).json()["detail"]
    assert error["loc"] == ["body", "image_urls", 0] and "not an image" in error["msg"]
