"""ImageGenerator on the real tiny Flux2Pipeline: progress, cancellation, refusals, encodings."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image

from pipeline.errors import Cancelled, Unsupported
from pipeline.generation import ImageGenerator
from pipeline.messages import GenerationParams, LoraRequest
from pipeline.tiny import ensure_tiny_pipeline

PARAMS = GenerationParams(
    prompt="a kite", width=512, height=512, num_inference_steps=4, guidance_scale=2.5, seed=5
)


@pytest.fixture(scope="module")
def generator(cache_dir: Path) -> ImageGenerator:
    pipe = Flux2Pipeline.from_pretrained(ensure_tiny_pipeline(cache_dir / "tiny"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return ImageGenerator(pipe)


@pytest.fixture
def decodes(generator: ImageGenerator, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts VAE decodes, to tell a cancelled run (no decode) from a finished one."""
    calls: list[int] = []
    original = generator.pipe.vae.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generator.pipe.vae, "decode", counting)
    yield calls


def test_progress_reports_every_step(generator: ImageGenerator) -> None:
    steps: list[tuple[int, int]] = []
    result = generator.generate("r1", PARAMS, lambda step, total: steps.append((step, total)), lambda: False)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.seed == 5 and result.has_nsfw_concepts == (False,)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (512, 512)


def test_cancel_stops_at_the_next_step_without_decoding(
    generator: ImageGenerator, decodes: list[int]
) -> None:
    steps: list[int] = []
    with pytest.raises(Cancelled):
        generator.generate("r2", PARAMS, lambda step, total: steps.append(step), lambda: len(steps) >= 2)
    assert steps == [1, 2]
    assert decodes == []
    generator.generate("r3", PARAMS, lambda step, total: None, lambda: False)  # still usable
    assert decodes == [1]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"loras": (LoraRequest("a/b", 1.0),)}, "loras"),
        ({"enable_prompt_expansion": True}, "enable_prompt_expansion"),
    ],
)
def test_unsupported_features_are_refused(
    generator: ImageGenerator, change: dict[str, Any], field: str
) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, **change})
    with pytest.raises(Unsupported) as raised:
        generator.generate("r4", params, lambda step, total: None, lambda: False)
    assert raised.value.field == field


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(generator: ImageGenerator, fmt: str, pil_format: str) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, "output_format": fmt, "num_images": 2})
    result = generator.generate("r5", params, lambda step, total: None, lambda: False)
    assert [Image.open(io.BytesIO(image.data)).format for image in result.images] == [pil_format] * 2
    assert result.images[0].content_type == f"image/{fmt}"
