"""LoRAs through the live server: by URL, by local path, cached, and every failure confined to its request."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from PIL import Image

from pipeline.testing import linear_shapes, write_lora
from pipeline.tiny import ensure_tiny_pipeline
from server.testing import LiveServer

BASE = {"prompt": "a harbour at noon", "image_size": "square", "num_inference_steps": 4, "seed": 3}


class FileServer:
    """A static file server on loopback that counts the requests it answers."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def shapes(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return linear_shapes(
        Flux2Transformer2DModel.from_pretrained(ensure_tiny_pipeline(cache_dir / "tiny") / "transformer")
    )


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, tuple[int, int]]
) -> Iterator[FileServer]:
    root = tmp_path_factory.mktemp("lora-http")
    names = list(shapes)
    write_lora(root / "style.safetensors", shapes, names[:8], rank=8, seed=1)
    write_lora(root / "detail.safetensors", shapes, names[4:12], rank=4, seed=2)
    write_lora(root / "huge-rank.safetensors", shapes, names[:2], rank=32, seed=3)
    (root / "notes.safetensors").write_text("this is not a safetensors file")
    (root / "model.ckpt").write_bytes(b"\x80\x04pickle")
    wrong = {"flux1.safetensors": {"some_layer": (3072, 3072)}}
    for name, layer_shapes in wrong.items():
        write_lora(root / name, layer_shapes, list(layer_shapes), rank=4, seed=4)
    server = FileServer(root)
    yield server
    server.httpd.shutdown()


def generate(server: LiveServer, **changes: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/fal-ai/flux-2/lora", json={**BASE, **changes}, timeout=120)


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    url = response.json()["images"][0]["url"]
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)), dtype=int)


def test_loras_by_url_scale_and_order(live_server: LiveServer, files: FileServer) -> None:
    style, detail = f"{files.url}/style.safetensors", f"{files.url}/detail.safetensors"
    base = pixels(generate(live_server))
    styled = pixels(generate(live_server, loras=[{"path": style, "scale": 1.0}]))
    assert np.abs(styled - base).mean() > 1  # the LoRA changes the picture
    # Scale 0 on every LoRA gives the base image bit for bit: empty contributions are exact zeros.
    assert np.array_equal(
        pixels(generate(live_server, loras=[{"path": style, "scale": 0}, {"path": detail, "scale": 0}])), base
    )
    both = pixels(
        generate(live_server, loras=[{"path": style, "scale": 0.8}, {"path": detail, "scale": 1.3}])
    )
    swapped = pixels(
        generate(live_server, loras=[{"path": detail, "scale": 1.3}, {"path": style, "scale": 0.8}])
    )
    assert np.abs(both - swapped).max() <= 1  # the same sum in another order: at most one 8-bit level
    assert np.array_equal(pixels(generate(live_server)), base)  # and back to no LoRA
    assert files.requests.count("/style.safetensors") == 1  # later uses came from the cache
    metrics = httpx.get(f"{live_server.url}/metrics").text
    assert 'flux2_lora_cache_hits_total{cache="disk"}' in metrics
    hits = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("flux2_lora_cache")
    }
    assert hits['flux2_lora_cache_hits_total{cache="disk"}'] >= 4  # style was fetched once, then reused
    assert hits['flux2_lora_cache_hits_total{cache="memory"}'] >= 3  # and parsed once


def test_local_lora_folder(
    live_server: LiveServer, lora_folder: Path, shapes: dict[str, tuple[int, int]]
) -> None:
    write_lora(lora_folder / "mine.safetensors", shapes, list(shapes)[:3], rank=2, seed=9)
    assert generate(live_server, loras=[{"path": "mine.safetensors"}]).status_code == 200
    assert generate(live_server, loras=[{"path": str(lora_folder / "mine.safetensors")}]).status_code == 200
    for outside in (
        "/etc/passwd.safetensors",
        "../mine.safetensors",
        str(lora_folder / ".." / "x.safetensors"),
    ):
        refused = generate(live_server, loras=[{"path": outside}])
        assert refused.status_code == 422, outside
        assert refused.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("missing.safetensors", "404"),
        ("notes.safetensors", "safetensors"),
        ("model.ckpt", "pickle"),
        ("huge-rank.safetensors", "rank 32"),
        ("flux1.safetensors", "another model"),
    ],
)
def test_a_bad_lora_fails_only_its_request(
    live_server: LiveServer, files: FileServer, name: str, words: str
) -> None:
    good = {"path": f"{files.url}/style.safetensors", "scale": 0.5}
    refused = generate(live_server, loras=[good, {"path": f"{files.url}/{name}"}])
    assert refused.status_code == 422
    error = refused.json()["detail"][0]
    assert error["loc"] == ["body", "loras", 1, "path"]
    assert words in error["msg"]
    # The slots are consistent afterwards: the same good request gives the same image as before.
    assert np.array_equal(
        pixels(generate(live_server, loras=[good])), pixels(generate(live_server, loras=[good]))
    )


def test_queue_mode_lora_error_surfaces_on_the_result(live_server: LiveServer, files: FileServer) -> None:
    body = {**BASE, "loras": [{"path": f"{files.url}/missing.safetensors"}]}
    submitted = httpx.post(f"{live_server.url}/queue/fal-ai/flux-2/lora", json=body).json()
    status = httpx.get(submitted["status_url"]).json()
    while status["status"] != "COMPLETED":
        time.sleep(0.05)
        status = httpx.get(submitted["status_url"]).json()
    assert status["error_type"] == "value_error"
    assert "404" in status["error"]
    result = httpx.get(submitted["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]
