"""ImageGenerator on the real tiny Flux2Pipeline: progress, cancellation, refusals, encodings."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from pipeline.errors import Cancelled, InvalidInput
from pipeline.generation import ImageGenerator
from pipeline.lora_cache import LoraMemoryCache
from pipeline.lora_slots import LoraSlots
from pipeline.messages import GenerationParams, Job, ResolvedLora
from pipeline.models import TinySafetyChecker
from pipeline.prompt_cache import PromptEmbeddingCache
from pipeline.safety import SafetyChecker
from pipeline.testing import linear_shapes, load_tiny, write_lora

PARAMS = GenerationParams(
    prompt="a kite", width=512, height=512, num_inference_steps=4, guidance_scale=2.5, seed=5
)


@pytest.fixture(scope="module")
def generator(cache_dir: Path) -> ImageGenerator:
    pipe = load_tiny(cache_dir)
    safety = SafetyChecker(TinySafetyChecker(source="tiny"), cache_dir, torch.device("cpu"))
    slots = LoraSlots(pipe.transformer, num_slots=3, max_rank=16)
    return ImageGenerator(pipe, slots, LoraMemoryCache(10**8), safety)


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
    result = generator.generate(
        Job("r1", PARAMS), lambda step, total: steps.append((step, total)), lambda: False
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.seed == 5 and result.has_nsfw_concepts == (False,)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (512, 512)


def test_cancel_stops_at_the_next_step_without_decoding(
    generator: ImageGenerator, decodes: list[int]
) -> None:
    steps: list[int] = []
    with pytest.raises(Cancelled):
        generator.generate(Job("r2", PARAMS), lambda step, total: steps.append(step), lambda: len(steps) >= 2)
    assert steps == [1, 2]
    assert decodes == []
    generator.generate(Job("r3", PARAMS), lambda step, total: None, lambda: False)  # still usable
    assert decodes == [1]


def test_prompt_expansion_is_seeded_and_reported(generator: ImageGenerator) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, "enable_prompt_expansion": True})
    first = generator.generate(Job("r4", params), lambda step, total: None, lambda: False)
    again = generator.generate(Job("r4", params), lambda step, total: None, lambda: False)
    other_seed = generator.generate(
        Job("r4", replace(params, seed=6)), lambda step, total: None, lambda: False
    )
    assert first.prompt != PARAMS.prompt  # the output reports the prompt actually used
    assert again.prompt == first.prompt and again.images == first.images
    assert other_seed.prompt != first.prompt
    # The image is the pipeline's for the expanded prompt: expansion only changes the text.
    plain = replace(PARAMS, prompt=first.prompt)
    assert (
        generator.generate(Job("r4", plain), lambda step, total: None, lambda: False).images == first.images
    )


def image(generator: ImageGenerator, params: GenerationParams, loras: tuple[ResolvedLora, ...] = ()) -> bytes:
    return generator.generate(Job("r", params, loras), lambda step, total: None, lambda: False).images[0].data


def test_loras_apply_and_a_refused_one_names_its_index(generator: ImageGenerator, tmp_path: Path) -> None:
    shapes = linear_shapes(generator.pipe.transformer)
    targets = list(shapes)[:6]
    good = write_lora(tmp_path / "good.safetensors", shapes, targets, rank=4, seed=1)
    too_big = write_lora(tmp_path / "big.safetensors", shapes, targets[:1], rank=32, seed=2)
    base = image(generator, PARAMS)
    lora = ResolvedLora(str(good), "good", 1.0, str(good))
    with_lora = image(generator, PARAMS, (lora,))
    assert with_lora != base
    refused = (lora, ResolvedLora(str(too_big), "big", 1.0, str(too_big)))
    with pytest.raises(InvalidInput) as raised:
        generator.generate(Job("r6", PARAMS, refused), lambda s, t: None, lambda: False)
    assert raised.value.loc == ("loras", 1, "path")
    assert "rank 32" in raised.value.message
    assert image(generator, PARAMS) == base  # the slots were emptied by the plain request
    assert image(generator, PARAMS, (lora,)) == with_lora
    assert generator.lora_cache.hits >= 1


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(generator: ImageGenerator, fmt: str, pil_format: str) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, "output_format": fmt, "num_images": 2})
    result = generator.generate(Job("r5", params), lambda step, total: None, lambda: False)
    assert [Image.open(io.BytesIO(image.data)).format for image in result.images] == [pil_format] * 2
    assert result.images[0].content_type == f"image/{fmt}"


@pytest.mark.parametrize(("threshold", "flagged"), [(0.0, True), (1.0, False)])
def test_safety_checker_blacks_out_flagged_images(
    generator: ImageGenerator, monkeypatch: pytest.MonkeyPatch, threshold: float, flagged: bool
) -> None:
    monkeypatch.setattr(generator.safety, "threshold", threshold)  # 0: every score is above it
    params = GenerationParams(**{**PARAMS.__dict__, "num_images": 2})
    result = generator.generate(Job("r7", params), lambda step, total: None, lambda: False)
    assert result.has_nsfw_concepts == (flagged, flagged)
    pixels = [Image.open(io.BytesIO(image.data)).convert("RGB") for image in result.images]
    assert all(p.size == (512, 512) for p in pixels)
    assert all((p.getextrema() == ((0, 0),) * 3) is flagged for p in pixels)


def test_safety_checker_can_be_turned_off(generator: ImageGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator.safety, "threshold", 0.0)
    params = GenerationParams(**{**PARAMS.__dict__, "enable_safety_checker": False})
    result = generator.generate(Job("r8", params), lambda step, total: None, lambda: False)
    assert result.has_nsfw_concepts == (False,)
    assert Image.open(io.BytesIO(result.images[0].data)).convert("RGB").getextrema() != ((0, 0),) * 3


def test_safety_checker_scores_are_probabilities(generator: ImageGenerator) -> None:
    scores = generator.safety.scores(
        [Image.new("RGB", (512, 512), (200, 30, 30)), Image.new("RGB", (64, 64))]
    )
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_prompt_cache_skips_the_text_encoder_and_changes_no_bit(
    generator: ImageGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    uncached = generator.generate(Job("r9", PARAMS), lambda step, total: None, lambda: False)
    monkeypatch.setattr(generator, "prompt_cache", PromptEmbeddingCache(max_bytes=10**8))
    calls: list[int] = []
    encoder_forward = generator.pipe.text_encoder.forward
    monkeypatch.setattr(
        generator.pipe.text_encoder, "forward", lambda *a, **k: calls.append(1) or encoder_forward(*a, **k)
    )
    first = generator.generate(Job("r9", PARAMS), lambda step, total: None, lambda: False)
    second = generator.generate(Job("r9", PARAMS), lambda step, total: None, lambda: False)
    assert len(calls) == 1  # the second request did not run the text encoder
    assert first.images == second.images == uncached.images
    generator.generate(Job("r9", replace(PARAMS, prompt="another")), lambda step, total: None, lambda: False)
    assert (generator.prompt_cache.hits, generator.prompt_cache.misses, len(calls)) == (1, 2, 2)


def test_prompt_cache_evicts_under_its_budget() -> None:
    one = torch.zeros(1, 512, 48)  # one tiny-model embedding: 98 KB
    cache = PromptEmbeddingCache(max_bytes=2 * one.numel() * one.element_size())
    for prompt in ("a", "b", "c", "a"):
        cache.get((prompt, 512, (10, 20, 30)), lambda: one.clone())
    assert (cache.hits, cache.misses, cache.evictions) == (0, 4, 2)  # "a" was evicted by "c", then recomputed
