"""The fetch stage in the server: a LoRA that drips in fails its request with a 422 naming the entry,
while requests without LoRAs go on."""

from __future__ import annotations

import time
from pathlib import Path

from tests.server.conftest import _harness
from tests.server.fetch.lora_server import LoraServer, Route, lora_bytes

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def test_a_slow_drip_lora_fails_its_request_and_others_go_on(lora_server: LoraServer, tmp_path: Path) -> None:
    url = lora_server.serve("/drip.safetensors", Route(lora_bytes(tmp_path, 1), drip=0.05))
    limits = {"download_min_bytes_per_second": 1000, "download_rate_window_seconds": 0.5}
    gen = _harness(tmp_path, hold=False, allow_private_lora_urls=True, **limits)
    h = next(gen)
    try:
        dripping = h.client.post("/queue/fal-ai/flux-2/lora", json={**BODY, "loras": [{"path": url}]}).json()
        assert h.client.post("/fal-ai/flux-2/lora", json=BODY).status_code == 200  # not held up
        deadline = time.monotonic() + 10
        while h.client.get(dripping["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = h.client.get(dripping["response_url"])
        assert result.status_code == 422
        (error,) = result.json()["detail"]
        assert error["loc"] == ["body", "loras", 0, "path"] and "under the minimum" in error["msg"]
    finally:
        gen.close()
