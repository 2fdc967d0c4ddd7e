"""Memory profiles on the tiny model: quantized weights through the same from_pretrained path, LoRA slots
on top of them, compiled presets without recompiles, and a clear refusal where a profile cannot run."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters

from pipeline.generation import ImageGenerator
from pipeline.loading import load_pipeline
from pipeline.memory import account, held_account, module_bytes
from pipeline.messages import GenerationParams, Job, ResolvedLora, WorkerConfig
from pipeline.models import ConfigError, Registry, load_registry
from pipeline.testing import linear_shapes, load_tiny, write_lora
from pipeline.tiny import ensure_tiny_pipeline
from pipeline.worker import load_generator

PARAMS = GenerationParams(
    prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=12, guidance_scale=2.5, seed=7
)
REGISTRY = """models:
  tiny:
    source: tiny
    dtype: bfloat16
    safety_checker: {source: tiny}
    memory_profiles:
      fp8: {min_device_memory_gib: 0, transformer: fp8, text_encoder: fp8}
      int8: {min_device_memory_gib: 0, transformer: int8}
      nf4: {min_device_memory_gib: 0, transformer: nf4, offload: model}
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    path = tmp_path_factory.mktemp("registry") / "models.yaml"
    path.write_text(REGISTRY)
    return load_registry(path)


@pytest.fixture(scope="module")
def fp8(registry: Registry, cache_dir: Path) -> Iterator[tuple[ImageGenerator, int]]:
    """The tiny model under the FP8 profile, compiled as `regular` runs it on a GPU."""
    torch._dynamo.reset()
    counters.clear()
    config = WorkerConfig(
        registry,
        "tiny",
        cache_dir,
        max_lora_rank=8,
        compile=True,
        warmup_sizes=((512, 512),),
        memory_profile="fp8",
    )
    generator, ready = load_generator(config)
    assert ready.memory_profile == "fp8" and ready.compiled
    try:
        yield generator, counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()


def draw(
    generator: ImageGenerator, params: GenerationParams, loras: tuple[ResolvedLora, ...] = ()
) -> np.ndarray:
    result = generator.generate(Job("profile", params, loras), lambda step, total: None, lambda: False)
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)), dtype=np.int16)


def weight_type(module: torch.nn.Module) -> str:
    return type(module.weight).__name__


def test_fp8_quantizes_the_transformer_and_the_language_model(fp8: tuple[ImageGenerator, int]) -> None:
    pipe = fp8[0].pipe
    blocks = pipe.transformer.transformer_blocks[0]
    assert weight_type(blocks.attn.to_q.base_layer) == "Float8Tensor"  # under its LoRA slot wrapper
    assert type(blocks.attn.to_q).__name__ == "TorchaoLoraLinear"  # peft's LoRA for torchao weights
    assert weight_type(pipe.text_encoder.model.language_model.layers[0].self_attn.q_proj) == "Float8Tensor"
    vision = [m for m in pipe.text_encoder.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(weight_type(m) == "Parameter" for m in vision)  # never used for text: left as is


def test_loras_and_presets_run_on_fp8_weights_without_recompiling(
    fp8: tuple[ImageGenerator, int], tmp_path: Path
) -> None:
    generator, graphs = fp8
    shapes = linear_shapes(generator.pipe.transformer)
    path = write_lora(tmp_path / "all.safetensors", shapes, list(shapes), 4, seed=1)
    lora = ResolvedLora(file=str(path), sha256="fp8-all", scale=1.0, source="all")
    with torch._dynamo.config.patch(error_on_recompile=True):
        base = draw(generator, PARAMS)
        with_lora = draw(generator, PARAMS, (lora,))
        muted = draw(generator, PARAMS, (replace(lora, scale=0.0),))
        high = draw(generator, replace(PARAMS, acceleration="high"), (lora,))
        eager = draw(generator, replace(PARAMS, acceleration="none"), (lora,))
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.abs(with_lora - base).mean() > 10  # the LoRA acts through the FP8 layers
    assert np.array_equal(muted, base)  # scale 0 adds exact zeros
    assert np.abs(high - with_lora).max() > 0
    # bf16 compiled vs eager: inductor's other rounding, which the random tiny model amplifies (seen: mean
    # 0.9 levels); the LoRA moves the image far more (seen: mean 24.8)
    assert np.abs(eager - with_lora).mean() < 2


def test_int8_profile(registry: Registry, cache_dir: Path) -> None:
    loaded = load_pipeline(registry.get("tiny"), cache_dir, "int8")
    assert loaded.profile.name == "int8"
    assert weight_type(loaded.pipe.transformer.proj_out) == "Int8Tensor"
    assert (
        weight_type(loaded.pipe.text_encoder.model.language_model.layers[0].self_attn.q_proj) == "Parameter"
    )


def test_nf4_needs_cuda(registry: Registry, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="'nf4': 4-bit \\(nf4\\) weights need a CUDA GPU"):
        load_pipeline(registry.get("tiny"), cache_dir, "nf4")


def test_fp8_weights_are_held_as_their_account_says(
    fp8: tuple[ImageGenerator, int], registry: Registry, cache_dir: Path
) -> None:
    """torchao quantizing the loaded model and torchao quantizing the meta-device model from its configs
    (pipeline/memory.py) give the same bytes, component by component: FLUX.2 [dev]'s FP8 account is exact."""
    pipe = fp8[0].pipe
    profile = registry.get("tiny").memory_profiles["fp8"]
    held = held_account(
        {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}, profile, 0
    )
    expected = account(ensure_tiny_pipeline(cache_dir / "tiny"), profile, dtype=torch.bfloat16, lora_rank=8)
    assert held.weights == expected.weights
    assert held.lora_slots == expected.lora_slots
    # really quantized: under the float32 model's half
    assert held.weights["transformer"] < module_bytes(load_tiny(cache_dir).transformer) / 2
