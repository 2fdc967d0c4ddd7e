"""Editing with reference images on the live server: the image equals a direct `Flux2Pipeline(image=...)`
call with the decoded originals, whichever way the references arrive (data: URI, http download, this
server's own file URL), sync and queued."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image

from pipeline.generation import pipeline_kwargs
from pipeline.testing import linear_shapes, load_tiny, write_lora
from server.schemas import Flux2EditInput
from server.testing import LiveServer
from tests.server.fetch.lora_server import LoraServer, Route

EDIT = {"prompt": "the same scene at night", "num_inference_steps": 4, "seed": 11}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (noise would make resampling differences invisible)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def pixels(url: str) -> np.ndarray:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def direct_pipeline(cache_dir: Path) -> Flux2Pipeline:
    return load_tiny(cache_dir)


def direct(pipe: Flux2Pipeline, body: dict[str, object], images: list[Image.Image]) -> np.ndarray:
    params = Flux2EditInput.model_validate(body).to_params()
    with torch.inference_mode():
        return np.asarray(pipe(**pipeline_kwargs(params, images)).images[0])


def test_data_uri_edit_over_a_megapixel_equals_the_direct_pipeline_call(
    live_server: LiveServer, direct_pipeline: Flux2Pipeline
) -> None:
    # 1300x900 is 1.17 MP: the server scales it down before the worker, as the pipeline would itself.
    original = photo(1300, 900)
    body = {**EDIT, "image_urls": [data_uri(original)]}
    response = httpx.post(f"{live_server.url}/fal-ai/flux-2/edit", json=body, timeout=300)
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    # Without image_size: the first reference's size at 1 MP (1231x852), floored to multiples of 16.
    assert (image["width"], image["height"]) == (1216, 848)
    assert np.array_equal(pixels(image["url"]), direct(direct_pipeline, body, [original]))


def test_queued_lora_edit_with_two_downloaded_references_and_image_size(
    live_server: LiveServer, direct_pipeline: Flux2Pipeline
) -> None:
    first, second = photo(400, 300, seed=1), photo(256, 320, seed=2)
    files = {"/a.jpg": _encoded(first, "JPEG"), "/b.png": _encoded(second, "PNG")}
    server = LoraServer()
    try:
        body = {
            **EDIT,
            "image_urls": [server.serve(path, Route(data)) for path, data in files.items()],
            "image_size": {"width": 512, "height": 512},
        }
        submitted = httpx.post(f"{live_server.url}/queue/fal-ai/flux-2/lora/edit", json=body, timeout=30)
        assert submitted.status_code == 200, submitted.text
        result = _wait_result(submitted.json()["response_url"])
    finally:
        server.close()
    (image,) = result["images"]
    assert (image["width"], image["height"]) == (512, 512)
    decoded = [Image.open(io.BytesIO(files[path])).convert("RGB") for path in ("/a.jpg", "/b.png")]
    assert np.array_equal(pixels(image["url"]), direct(direct_pipeline, body, decoded))


def test_a_generated_image_is_edited_by_its_own_url_read_from_disk(
    live_server: LiveServer, direct_pipeline: Flux2Pipeline
) -> None:
    generated = httpx.post(
        f"{live_server.url}/fal-ai/flux-2",
        json={"prompt": "a red barn", "image_size": "square", "num_inference_steps": 4, "seed": 5},
        timeout=120,
    ).json()["images"][0]["url"]
    body = {**EDIT, "image_urls": [generated]}
    response = httpx.post(f"{live_server.url}/fal-ai/flux-2/edit", json=body, timeout=120)
    assert response.status_code == 200, response.text
    original = Image.fromarray(pixels(generated))
    assert np.array_equal(
        pixels(response.json()["images"][0]["url"]), direct(direct_pipeline, body, [original])
    )


def test_a_lora_edit_equals_diffusers_own_lora_loading(
    live_server: LiveServer, cache_dir: Path, lora_folder: Path, direct_pipeline: Flux2Pipeline
) -> None:
    pipe = load_tiny(cache_dir)
    shapes = linear_shapes(pipe.transformer)
    lora = write_lora(lora_folder / "edit-style.safetensors", shapes, list(shapes), rank=4, seed=21)
    original = photo(320, 256, seed=4)
    body = {**EDIT, "image_urls": [data_uri(original)], "loras": [{"path": lora.name, "scale": 0.8}]}
    response = httpx.post(f"{live_server.url}/fal-ai/flux-2/lora/edit", json=body, timeout=120)
    assert response.status_code == 200, response.text
    served = pixels(response.json()["images"][0]["url"]).astype(int)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    expected = direct(pipe, body, [original]).astype(int)
    plain = direct(direct_pipeline, body, [original]).astype(int)
    # The text-to-image tolerance (1e-4 on [0, 1] floats) is below one 8-bit level: at most one apart here.
    assert np.abs(served - expected).max() <= 1
    assert np.abs(expected - plain).max() > 10  # the LoRA does change the edit


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("data:image/png;base64,not*base64", "base64 is invalid"),
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "not an image"),
        ("ftp://example.com/a.png", "must be an https:// or http:// URL"),
        ("file:///etc/passwd", "must be an https:// or http:// URL"),
        ("data:image/png;base64,", "the data: URI is empty"),
        ("http://127.0.0.1:9/x.png", "could not connect"),
        (data_uri(photo(40, 200)), "at least 64 pixels"),
        (data_uri(photo(1000, 100)), "aspect ratio must be at most 8:1"),
    ],
)
def test_a_bad_reference_is_a_422_at_its_index(live_server: LiveServer, reference: str, says: str) -> None:
    body = {**EDIT, "image_urls": [data_uri(photo(128, 128)), reference]}
    response = httpx.post(f"{live_server.url}/fal-ai/flux-2/edit", json=body, timeout=60)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_urls", 1]
    assert says in error["msg"]
    assert len(str(error["input"])) < 300  # a data: URI is quoted short


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _wait_result(response_url: str) -> dict[str, object]:
    httpx.get(f"{response_url}/status/stream", timeout=300).raise_for_status()  # returns once COMPLETED
    result = httpx.get(response_url, timeout=30)
    assert result.status_code == 200, result.text
    body: dict[str, object] = result.json()
    return body
