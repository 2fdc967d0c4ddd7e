"""Switching LoRAs in the fixed slots never recompiles a compiled transformer, and changes what it draws.

The tiny pipeline gets `LoraSlots` (every slot always active, as the worker sets them up for compiled
execution), then the regional compile the worker uses (`Accelerator.compile`: each Flux2TransformerBlock /
Flux2SingleTransformerBlock forward through inductor with fullgraph=True, the peft-wrapped Linears inside
them traced as part of the block; the embedders and output layers outside stay eager). After one warm-up
generation, `error_on_recompile` turns any guard failure into an exception, and the test swaps through LoRA
sets of other ranks, targets, scales and counts, rendering after each. Every compiled image is compared with
the same call run eagerly on the same module (`set_stance("force_eager")`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from torch._dynamo.utils import counters

from pipeline.acceleration import Accelerator
from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraSlots, ParsedLora
from pipeline.testing import linear_shapes, load_tiny, render, write_lora

MAX_RANK = 16

# Compiled vs eager on images in [0, 1]. Inductor fuses and reorders the float32 sums (seen: up to 3.4e-5
# with three LoRAs, 2.8e-6 with none), and the random tiny model amplifies such rounding. 1e-4 sits above
# that noise and 39x below one 8-bit level (3.9e-3); each LoRA set must move the image 100x further.
COMPILED_ATOL = 1e-4


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    targets: tuple[str, ...]
    seed: int


def lora_specs(modules: list[str]) -> dict[str, LoraSpec]:
    """LoRAs of different ranks over different module subsets of the tiny transformer."""
    in_blocks = [m for m in modules if m.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    double_attn = [m for m in in_blocks if m.startswith("transformer_blocks.") and ".attn." in m]
    feed_forward = [m for m in in_blocks if ".ff" in m or m.startswith("single_transformer_blocks.")]
    outside = [m for m in modules if m not in in_blocks]  # embedders, modulation, norm_out, proj_out: eager
    return {
        "everything": LoraSpec(MAX_RANK, tuple(modules), seed=1),
        "attention": LoraSpec(4, tuple(double_attn), seed=2),
        "feed-forward": LoraSpec(8, tuple(feed_forward), seed=3),
        "outside-blocks": LoraSpec(2, tuple(outside), seed=4),
    }


# (LoRA name, scale) lists, applied in this order after the warm-up (which runs with no LoRA).
SWAPS: list[tuple[tuple[str, float], ...]] = [
    (("everything", 1.0),),
    (("attention", 0.8), ("feed-forward", -0.6)),
    (("everything", 0.5), ("attention", 1.2), ("outside-blocks", 2.0)),
    (("feed-forward", 0.0),),  # scale 0: exactly the base image
    (),  # no LoRA: exactly the base image
    (("outside-blocks", 1.0),),  # only modules outside the compiled blocks
    (("feed-forward", 1.5), ("attention", 0.3)),  # same LoRAs, other slots and scales
    (("everything", 1.0),),  # back to the first set: the first image again, bit for bit
]


def render_eagerly(pipe: Flux2Pipeline) -> np.ndarray:
    # The same module, uncompiled: leaving the stance does not invalidate the compiled code.
    with torch.compiler.set_stance("force_eager"):
        return render(pipe)


@dataclass
class Compiled:
    pipe: Flux2Pipeline
    slots: LoraSlots
    loras: dict[str, ParsedLora]
    base: np.ndarray  # the warm-up image: compiled, empty slots
    graphs: int  # dynamo graphs after the warm-up


@pytest.fixture(scope="module")
def compiled(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compiled]:
    torch._dynamo.reset()  # no compiled code or counters from earlier tests
    counters.clear()
    pipe = load_tiny(cache_dir)
    shapes = linear_shapes(pipe.transformer)
    directory = tmp_path_factory.mktemp("compile-loras")
    loras = {
        name: read_lora_file(
            write_lora(directory / f"{name}.safetensors", shapes, list(spec.targets), spec.rank, spec.seed),
            name,
        )
        for name, spec in lora_specs(list(shapes)).items()
    }
    # skip_empty=False as the worker does for a compiled transformer: all slots stay active, so no peft flag
    # or adapter list changes on a swap. (With skip_empty=True, the first LoRA after an empty set flips
    # `_disable_adapters` and fails a dynamo guard on every LoraLayer's forward.)
    slots = LoraSlots(pipe.transformer, num_slots=3, max_rank=MAX_RANK, skip_empty=False)
    # Regional compile works on peft-wrapped blocks: peft replaces the Linears inside each block by LoraLayer
    # modules, but the blocks stay, and fullgraph=True proves the LoRA forward traces without a graph break.
    Accelerator(pipe.transformer).compile()
    started = time.perf_counter()
    base = render(pipe)
    print(f"warm-up (compile + first run): {time.perf_counter() - started:.1f} s")
    graphs = counters["stats"]["unique_graphs"]
    try:
        yield Compiled(pipe, slots, loras, base, graphs)
    finally:
        torch._dynamo.reset()


@pytest.mark.timeout(600)
def test_lora_switches_never_recompile(compiled: Compiled) -> None:
    assert compiled.graphs >= 2  # one per block class: the blocks really run compiled
    assert np.array_equal(render_eagerly(compiled.pipe), render_eagerly(compiled.pipe))
    images: list[np.ndarray] = []
    # Any guard that fails from here on raises RecompileError inside the pipeline call.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loras in SWAPS:
            compiled.slots.apply([(compiled.loras[name], scale) for name, scale in loras])
            image = render(compiled.pipe)
            eager = render_eagerly(compiled.pipe)
            np.testing.assert_allclose(image, eager, rtol=0, atol=COMPILED_ATOL, err_msg=str(loras))
            if any(scale != 0 for _, scale in loras):
                assert np.abs(image - compiled.base).max() > 100 * COMPILED_ATOL, loras
            else:  # empty slots add exact zeros, in compiled code too
                assert np.array_equal(image, compiled.base), loras
            images.append(image)
    # Nothing new was compiled either (a first compile of another frame would not count as a recompile).
    assert counters["stats"]["unique_graphs"] == compiled.graphs
    assert np.array_equal(images[-1], images[0])
    assert not np.array_equal(images[1], images[6])  # same two LoRAs at other scales: another image
    assert compiled.slots.loaded == [("everything", 1.0), None, None]
