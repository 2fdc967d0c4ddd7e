"""The `acceleration` presets on the tiny model, eager and compiled on CPU.

Two generators load the tiny model the way the worker does: one eager (what a CPU server runs), one with
its blocks compiled and warmed up. The step cache is checked by counting real block computations; the
compiled one must serve every preset, size, batch and LoRA set after its warm-up without recompiling, and
draw what the eager one draws.
"""

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

from pipeline.acceleration import choose_attention_backend, step_cache_config
from pipeline.errors import InvalidInput
from pipeline.generation import ImageGenerator
from pipeline.messages import GenerationParams, Job, ResolvedLora, WorkerConfig
from pipeline.models import load_registry
from pipeline.testing import linear_shapes, write_lora
from pipeline.worker import load_generator

ROOT = Path(__file__).resolve().parents[2]
PARAMS = GenerationParams(
    prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=12, guidance_scale=2.5, seed=7
)
WARMUP_SIZES = ((512, 512), (768, 512))


def load(cache_dir: Path, compile_blocks: bool) -> ImageGenerator:
    config = WorkerConfig(
        load_registry(ROOT / "models.yaml"),
        "tiny",
        cache_dir,
        max_lora_rank=8,
        compile=compile_blocks,
        warmup_sizes=WARMUP_SIZES,
        # Compiled, a non-default backend: it runs SDPA inside an `sdpa_kernel` context, as the cuDNN
        # backend a GPU gets does, and that must trace into the blocks' graphs too (fullgraph).
        attention_backend="_native_math" if compile_blocks else None,
    )
    generator, ready = load_generator(config)
    assert (
        ready.attention_backend
        == generator.accelerator.attention_backend
        == (config.attention_backend or "native")
    )
    return generator


def draw(
    generator: ImageGenerator,
    params: GenerationParams,
    loras: tuple[ResolvedLora, ...] = (),
    references: tuple[str, ...] = (),
) -> list[np.ndarray]:
    job = Job("acceleration", params, loras, references)
    result = generator.generate(job, lambda step, total: None, lambda: False)
    return [np.asarray(Image.open(io.BytesIO(image.data)), dtype=np.int16) for image in result.images]


@pytest.fixture(scope="module")
def eager(cache_dir: Path) -> ImageGenerator:
    return load(cache_dir, compile_blocks=False)


@pytest.fixture(scope="module")
def compiled(cache_dir: Path) -> Iterator[tuple[ImageGenerator, int]]:
    torch._dynamo.reset()
    counters.clear()
    generator = load(cache_dir, compile_blocks=True)
    try:
        yield generator, counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def lora(eager: ImageGenerator, tmp_path_factory: pytest.TempPathFactory) -> ResolvedLora:
    shapes = linear_shapes(eager.pipe.transformer)
    path = write_lora(tmp_path_factory.mktemp("lora") / "all.safetensors", shapes, list(shapes), 4, seed=1)
    return ResolvedLora(file=str(path), sha256="lora-all", scale=0.8, source="all.safetensors")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """Reference images as the HTTP side hands them over (RGB PNGs), of four sizes."""
    folder = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(((512, 512), (384, 640), (256, 256), (700, 300))):
        pixels = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return tuple(paths)


@pytest.fixture
def block_computations(eager: ImageGenerator) -> Iterator[list[int]]:
    """Counts forwards of an attention module inside the first block: it runs only when the block really
    computes, not when the step cache skips the block."""
    calls: list[int] = []
    handle = eager.pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args: calls.append(1)
    )
    yield calls
    handle.remove()


def test_step_cache_schedule() -> None:
    config = step_cache_config(28)
    assert config is not None and config.use_lite_mode
    assert (config.disable_cache_before_step, config.disable_cache_after_step, config.cache_interval) == (
        7,
        26,
        3,
    )
    assert step_cache_config(4) is None  # too short to skip anything: `high` is `regular`


def test_high_skips_blocks_and_forgets_each_run(eager: ImageGenerator, block_computations: list[int]) -> None:
    regular = draw(eager, PARAMS)
    assert len(block_computations) == 12
    block_computations.clear()
    high = draw(eager, replace(PARAMS, acceleration="high"))
    # 12 steps: 0-2 computed, then every third (4, 7), then the last two (10, 11)
    assert len(block_computations) == 7
    assert np.abs(high[0] - regular[0]).max() > 0  # predicted steps change the result
    draw(eager, replace(PARAMS, width=768))  # a run in between must not leak state into the next
    assert np.array_equal(draw(eager, replace(PARAMS, acceleration="high"))[0], high[0])
    assert not hasattr(eager.pipe.transformer.transformer_blocks[0], "_diffusers_hook") or not (
        eager.pipe.transformer.transformer_blocks[0]._diffusers_hook.hooks
    )  # hooks come off after the run


def test_none_is_regular_when_nothing_is_compiled(eager: ImageGenerator) -> None:
    assert np.array_equal(draw(eager, replace(PARAMS, acceleration="none"))[0], draw(eager, PARAMS)[0])


def test_unknown_preset_is_refused(eager: ImageGenerator) -> None:
    with pytest.raises(InvalidInput) as refused:
        draw(eager, replace(PARAMS, acceleration="ludicrous"))
    assert refused.value.loc == ("acceleration",)


@pytest.mark.timeout(900)
def test_compiled_presets_never_recompile(
    compiled: tuple[ImageGenerator, int],
    eager: ImageGenerator,
    lora: ResolvedLora,
    references: tuple[str, ...],
) -> None:
    generator, graphs = compiled
    assert generator.accelerator.compiled and graphs >= 2  # the blocks really run compiled
    edit = replace(PARAMS, width=None, height=None, num_inference_steps=4)
    runs = [
        (PARAMS, (), ()),
        (replace(PARAMS, acceleration="high"), (lora,), ()),
        (replace(PARAMS, acceleration="none", width=768), (), ()),
        (replace(PARAMS, num_images=3), (lora,), ()),
        (replace(PARAMS, acceleration="high", width=640, height=384), (), ()),  # not a warmed-up size
        (replace(PARAMS, acceleration="none"), (lora,), ()),
        # Edits: 1 to 4 references of other sizes, output sizes from the first reference or given.
        (edit, (), references[:1]),
        (
            replace(edit, width=640, height=384, acceleration="high", num_inference_steps=12),
            (lora,),
            references[1:3],
        ),
        (edit, (lora,), references),
        (replace(PARAMS, acceleration="high"), (), ()),
        (PARAMS, (), ()),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any guard failure raises
        for params, loras, images_in in runs:
            images = draw(generator, params, loras, images_in)
            reference = draw(eager, params, loras, images_in)
            for image, expected in zip(images, reference, strict=True):
                if params.acceleration == "none":  # the same modules run eagerly: the same bits
                    assert np.array_equal(image, expected), params
                else:  # inductor reorders float sums; the images agree within one 8-bit level
                    assert np.abs(image - expected).max() <= 1, params
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new compiled, either


def test_attention_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert choose_attention_backend(cpu) == "native"
    assert choose_attention_backend(cpu, "_native_math") == "_native_math"
    with pytest.raises(RuntimeError, match="flash-attn"):  # asked for, not installed: startup fails clearly
        choose_attention_backend(cpu, "flash")
    with pytest.raises(ValueError, match="warp"):
        choose_attention_backend(cpu, "warp")
