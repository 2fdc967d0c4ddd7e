"""The real Python `fal_client` against a live server running the tiny FLUX.2 pipeline."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import fal_client
import httpx
import pytest
from PIL import Image

from server.testing import LiveServer

APP = "fal-ai/flux-2/lora"
FAST = {"prompt": "a red bicycle", "image_size": "square", "num_inference_steps": 4}


def fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


def test_subscribe(fal: fal_client.SyncClient) -> None:
    updates: list[Any] = []
    result = fal.subscribe(APP, {**FAST, "seed": 11}, with_logs=True, on_queue_update=updates.append)
    assert set(result) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert result["seed"] == 11 and result["prompt"] == FAST["prompt"]
    assert result["has_nsfw_concepts"] == [False]
    image = result["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
    assert fetch_image(image["url"]).size == (512, 512)
    assert isinstance(updates[-1], fal_client.Completed)
    logs = [entry["message"] for update in updates if getattr(update, "logs", None) for entry in update.logs]
    assert "step 4/4" in logs


def test_submit_status_result(fal: fal_client.SyncClient) -> None:
    handle = fal.submit(APP, {**FAST, "num_images": 2, "output_format": "jpeg"})
    events = list(handle.iter_events(with_logs=True, interval=0.05))
    assert isinstance(events[-1], fal_client.Completed)
    assert events[-1].metrics["inference_time"] > 0
    assert isinstance(fal.status(APP, handle.request_id), fal_client.Completed)
    result = fal.result(APP, handle.request_id)
    assert [image["content_type"] for image in result["images"]] == ["image/jpeg"] * 2
    assert fetch_image(result["images"][1]["url"]).format == "JPEG"


def test_run_sync_with_data_uri(fal: fal_client.SyncClient) -> None:
    result = fal.run("fal-ai/flux-2", {**FAST, "sync_mode": True, "output_format": "webp"})
    assert result["images"][0]["url"].startswith("data:image/webp;base64,")


def test_cancel_a_queued_request(fal: fal_client.SyncClient) -> None:
    busy = fal.submit(APP, {**FAST, "image_size": "landscape_4_3", "num_inference_steps": 50})
    queued = fal.submit(APP, FAST)
    queued.cancel()
    status = queued.status()
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "request_cancelled"
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        queued.cancel()  # already completed
    assert raised.value.status_code == 400
    assert busy.get()["images"]


def test_validation_error_sync_and_queue(fal: fal_client.SyncClient) -> None:
    for call in (fal.run, fal.subscribe):
        with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
            call(APP, {**FAST, "num_inference_steps": 1000})
        assert raised.value.status_code == 422
        detail = raised.value.message
        assert isinstance(detail, list) and detail[0]["loc"] == ["body", "num_inference_steps"]


def test_async_client(fal: fal_client.SyncClient, live_server: LiveServer) -> None:
    async def main() -> list[dict[str, Any]]:
        client = fal_client.AsyncClient()
        return list(await asyncio.gather(*(client.subscribe(APP, {**FAST, "seed": s}) for s in (1, 2))))

    first, second = asyncio.run(main())
    assert (first["seed"], second["seed"]) == (1, 2)


def test_cancel_a_running_request_stops_it(fal: fal_client.SyncClient) -> None:
    handle = fal.submit(APP, {**FAST, "image_size": "square_hd", "num_inference_steps": 50})
    for event in handle.iter_events(with_logs=True, interval=0.02):
        if isinstance(event, fal_client.InProgress) and any("step" in e["message"] for e in event.logs or []):
            break
    handle.cancel()
    *_, status = handle.iter_events(with_logs=True, interval=0.02)  # ends with Completed
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "request_cancelled"
    steps = [e["message"] for e in status.logs or [] if e["message"].startswith("step ")]
    assert "step 50/50" not in steps
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        handle.get()
    assert raised.value.status_code == 400


def test_acceleration_presets(fal: fal_client.SyncClient) -> None:
    """Every preset through the real client; on this CPU server `none` and `regular` both run eager (the
    same image), and `high` skips blocks on some steps (another image)."""
    body = {**FAST, "num_inference_steps": 12, "seed": 5, "sync_mode": True}
    images = {
        preset: fal.run(APP, {**body, "acceleration": preset})["images"][0]["url"]
        for preset in ("none", "regular", "high")
    }
    assert images["none"] == images["regular"]
    assert images["high"] != images["regular"]
