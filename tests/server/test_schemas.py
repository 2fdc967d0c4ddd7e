"""Every input field's default, bounds and type, as fal documents them, checked over HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from server.schemas import Flux2Input, Flux2LoraInput
from tests.server.conftest import Harness

LORA = "/fal-ai/flux-2/lora"


def test_defaults_match_fal() -> None:
    parsed = Flux2LoraInput.model_validate({"prompt": "a fox"})
    assert parsed.model_dump() == {
        "prompt": "a fox",
        "guidance_scale": 2.5,
        "seed": None,
        "num_inference_steps": 28,
        "image_size": "landscape_4_3",
        "num_images": 1,
        "acceleration": "regular",
        "enable_prompt_expansion": False,
        "sync_mode": False,
        "enable_safety_checker": True,
        "output_format": "png",
        "loras": [],
    }
    assert "loras" not in Flux2Input.model_fields


@pytest.mark.parametrize(
    ("preset", "size"),
    [
        ("square_hd", (1024, 1024)),
        ("square", (512, 512)),
        ("portrait_4_3", (768, 1024)),
        ("portrait_16_9", (576, 1024)),
        ("landscape_4_3", (1024, 768)),
        ("landscape_16_9", (1024, 576)),
    ],
)
def test_presets(preset: str, size: tuple[int, int]) -> None:
    assert Flux2Input.model_validate({"prompt": "p", "image_size": preset}).dimensions() == size


@pytest.mark.parametrize(
    ("asked", "got"),
    [
        ((512, 512), (512, 512)),
        ((700, 1000), (704, 1008)),
        ((520, 2047), (528, 2048)),
        ((1031, 1033), (1024, 1040)),
    ],
)
def test_custom_sizes_round_to_multiples_of_16(asked: tuple[int, int], got: tuple[int, int]) -> None:
    body = {"prompt": "p", "image_size": {"width": asked[0], "height": asked[1]}}
    assert Flux2Input.model_validate(body).dimensions() == got


def test_absent_seed_is_drawn_and_in_range() -> None:
    seeds = {Flux2Input.model_validate({"prompt": "p"}).to_params().seed for _ in range(5)}
    assert len(seeds) == 5
    assert all(0 <= seed < 2**64 for seed in seeds)


def test_seed_above_2_63_is_accepted() -> None:
    assert Flux2Input.model_validate({"prompt": "p", "seed": 2**64 - 1}).to_params().seed == 2**64 - 1


VALID: list[tuple[str, Any]] = [
    ("guidance_scale", 0),
    ("guidance_scale", 20),
    ("num_inference_steps", 4),
    ("num_inference_steps", 50),
    ("num_images", 4),
    ("seed", 0),
    ("acceleration", "none"),
    ("acceleration", "high"),
    ("output_format", "jpeg"),
    ("output_format", "webp"),
    ("image_size", {"width": 2048, "height": 512}),
    ("enable_safety_checker", False),
]

INVALID: list[tuple[str, Any, str]] = [
    ("prompt", None, "string_type"),
    ("prompt", "", "string_too_short"),
    ("guidance_scale", -0.1, "greater_than_equal"),
    ("guidance_scale", 20.5, "less_than_equal"),
    ("guidance_scale", "much", "float_parsing"),
    ("num_inference_steps", 3, "greater_than_equal"),
    ("num_inference_steps", 51, "less_than_equal"),
    ("num_inference_steps", 4.5, "int_from_float"),
    ("num_images", 0, "greater_than_equal"),
    ("num_images", 5, "less_than_equal"),
    ("seed", -1, "greater_than_equal"),
    ("seed", 2**64, "less_than_equal"),
    ("acceleration", "turbo", "literal_error"),
    ("output_format", "gif", "literal_error"),
    ("sync_mode", "maybe", "bool_parsing"),
    ("enable_prompt_expansion", [], "bool_type"),
    ("loras", [{"path": "a"}] * 4, "too_long"),
    ("loras", [{"scale": 1}], "missing"),
    ("loras", [{"path": "a", "scale": 4.5}], "less_than_equal"),
    ("loras", [{"path": "a", "scale": -1}], "greater_than_equal"),
    ("loras", "a.safetensors", "list_type"),
]


@pytest.mark.parametrize(("field", "value"), VALID)
def test_bounds_accept(harness: Harness, field: str, value: Any) -> None:
    response = harness.client.post(LORA, json={"prompt": "p", "image_size": "square", field: value})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("field", "value", "error_type"), INVALID)
def test_bounds_reject_with_fal_shape(harness: Harness, field: str, value: Any, error_type: str) -> None:
    body = {"prompt": "p", field: value} if field != "prompt" else {field: value}
    response = harness.client.post(LORA, json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["type"] == error_type and e["loc"][:2] == ["body", field] for e in errors), errors
    assert all({"type", "loc", "msg", "input"} <= set(e) for e in errors)
    assert not harness.worker.submitted


@pytest.mark.parametrize("size", [{"width": 511, "height": 512}, {"width": 512, "height": 2049}, "huge"])
def test_image_size_out_of_range(harness: Harness, size: Any) -> None:
    response = harness.client.post(LORA, json={"prompt": "p", "image_size": size})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "image_size"]


def test_loras_refused_by_the_plain_app(harness: Harness) -> None:
    """`fal-ai/flux-2` has no loras field: extra fields are ignored, as fal ignores them."""
    response = harness.client.post(
        "/fal-ai/flux-2", json={"prompt": "p", "image_size": "square", "loras": []}
    )
    assert response.status_code == 200


def test_body_that_is_not_json(harness: Harness) -> None:
    response = harness.client.post(LORA, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_body_that_is_not_an_object(harness: Harness) -> None:
    response = harness.client.post(LORA, json=["prompt"])
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]
