"""API keys: required when configured, and each key sees only its own requests and files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.auth import KeyRing
from tests.server.conftest import Harness, _harness

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}
ALPHA, BETA = {"Authorization": "Key alpha-key"}, {"Authorization": "Bearer beta-key"}


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Harness]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("beta-key\n")
    yield from _harness(tmp_path, hold=False, api_keys=("alpha-key",), api_keys_file=keys_file)


def test_keys_are_required_on_fal_routes_only(keyed: Harness) -> None:
    routes = [
        ("POST", "/fal-ai/flux-2/lora"),
        ("POST", "/queue/fal-ai/flux-2/lora"),
        ("GET", "/queue/fal-ai/flux-2/requests/x/status"),
        ("PUT", "/queue/fal-ai/flux-2/requests/x/cancel"),
        ("GET", "/files/0123456789abcdef0123456789abcdef.png"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": "alpha-key"}):
            response = keyed.client.request(method, path, json=BODY, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert "API key" in response.json()["detail"]
    for path in ("/health", "/ready", "/docs", "/metrics", "/"):
        assert keyed.client.get(path).status_code == 200, path
    assert keyed.client.post("/fal-ai/flux-2/lora", json=BODY, headers=ALPHA).status_code == 200
    assert (
        keyed.client.post("/fal-ai/flux-2/lora", json=BODY, headers=BETA).status_code == 200
    )  # from the file


def test_a_key_sees_only_its_own_requests_and_files(keyed: Harness) -> None:
    mine = keyed.client.post("/queue/fal-ai/flux-2/lora", json=BODY, headers=ALPHA).json()
    result = keyed.client.get(mine["response_url"], headers=ALPHA)
    assert result.status_code == 200
    image_url = result.json()["images"][0]["url"]
    assert keyed.client.get(image_url, headers=ALPHA).status_code == 200
    for url in (mine["status_url"], mine["status_url"] + "/stream", mine["response_url"], image_url):
        assert keyed.client.get(url, headers=BETA).status_code == 404, url
    cancel = keyed.client.put(mine["cancel_url"], headers=BETA)
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})
    assert keyed.client.put(mine["cancel_url"], headers=ALPHA).status_code == 400  # already completed


def test_keyring() -> None:
    ring = KeyRing(["k1", "k2"])
    assert ring.enabled and not KeyRing([]).enabled
    assert ring.owner("Key k1") == ring.owner("Bearer k1") == ring.owner("key  k1 ") is not None
    assert ring.owner("Key k1") != ring.owner("Key k2")
    assert ring.owner("Key k3") is None and ring.owner(None) is None and ring.owner("k1") is None
