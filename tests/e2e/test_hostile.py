"""Hostile and malformed input against the live server: every one gets a 4xx, none harms the worker."""

from __future__ import annotations

import httpx
import pytest

from server.testing import LiveServer

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}

HOSTILE_JSON: list[tuple[str, object]] = [
    ("10k loras", {**BODY, "loras": [{"path": "a/b"}] * 10_000}),
    ("10k-entry image_size", {**BODY, "image_size": list(range(10_000))}),
    ("nested arrays", {**BODY, "prompt": [[[[[[[[[["x"]]]]]]]]]]}),
    ("huge prompt", {**BODY, "prompt": "ä" * 30_000}),
    ("huge number", {**BODY, "seed": 10**400}),
    ("nan guidance", {**BODY, "guidance_scale": "NaN"}),
    ("infinite guidance", {**BODY, "guidance_scale": "Infinity"}),
    ("traversal lora", {**BODY, "loras": [{"path": "../../../../etc/passwd"}]}),
    ("file url lora", {**BODY, "loras": [{"path": "file:///etc/passwd"}]}),
    ("metadata lora", {**BODY, "loras": [{"path": "http://169.254.169.254/latest/meta-data"}]}),
    ("pickle lora", {**BODY, "loras": [{"path": "https://example.com/model.ckpt"}]}),
]

HOSTILE_RAW: list[tuple[str, bytes]] = [
    ("lone surrogate", b'{"prompt": "\\ud800 a"}'),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}'),
    ("truncated", b'{"prompt": "a'),
    ("not an object", b"[1, 2, 3]"),
    ("empty", b""),
    ("deep nesting", b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
]


def assert_refused(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert "detail" in response.json()


@pytest.mark.parametrize(("name", "body"), HOSTILE_JSON, ids=[name for name, _ in HOSTILE_JSON])
def test_hostile_json(live_server: LiveServer, name: str, body: object) -> None:
    assert_refused(httpx.post(f"{live_server.url}/fal-ai/flux-2/lora", json=body, timeout=60))


@pytest.mark.parametrize(("name", "raw"), HOSTILE_RAW, ids=[name for name, _ in HOSTILE_RAW])
def test_hostile_bytes(live_server: LiveServer, name: str, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    assert_refused(
        httpx.post(f"{live_server.url}/fal-ai/flux-2/lora", content=raw, headers=headers, timeout=60)
    )


def test_unicode_edge_cases_are_served(live_server: LiveServer) -> None:
    for prompt in ("👩‍🚀 🏳️‍🌈 emoji", "عربي RTL ‮override‬", "zero\u200bwidth", "combining é", "tab\tnew\nline"):
        response = httpx.post(
            f"{live_server.url}/fal-ai/flux-2/lora", json={**BODY, "prompt": prompt}, timeout=60
        )
        assert response.status_code == 200, prompt
        assert response.json()["prompt"] == prompt


def test_the_worker_survives_all_of_it(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.url}/ready").json()["worker_restarts"] == 0
    assert httpx.post(f"{live_server.url}/fal-ai/flux-2/lora", json=BODY, timeout=60).status_code == 200
