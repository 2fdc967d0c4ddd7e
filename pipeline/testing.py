"""The tiny FLUX.2 pipeline and synthetic LoRA files, as the tests and the benchmark scripts use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from safetensors.torch import save_file

from pipeline.tiny import ensure_tiny_pipeline


def load_tiny(cache_dir: Path) -> Flux2Pipeline:
    """A fresh tiny pipeline in float32 from the build cache under `cache_dir` (built there if missing)."""
    pipe = Flux2Pipeline.from_pretrained(ensure_tiny_pipeline(cache_dir / "tiny"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe


def render(pipe: Flux2Pipeline, size: int = 512, seed: int = 3) -> np.ndarray:
    """One fixed request, as float images in [0, 1]. Under inference_mode like `ImageGenerator.generate`:
    grad mode is part of dynamo's guards, so compiled tests must render the way the server does."""
    with torch.inference_mode():
        output = pipe(
            prompt="a lighthouse at dusk",
            height=size,
            width=size,
            num_inference_steps=4,
            guidance_scale=2.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    return np.asarray(output.images)


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} for every Linear the transformer has (seen through any
    LoRA slots already attached: a slot's base layer under its module's own name, its lora_A/B skipped)."""
    return {
        name.removesuffix(".base_layer"): (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name
    }


def write_lora(
    path: Path, shapes: dict[str, tuple[int, int]], targets: list[str], rank: int, seed: int, std: float = 0.3
) -> Path:
    """A LoRA file in diffusers form with random weights on `targets` (module names of `shapes`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        in_features, out_features = shapes[name]
        tensors[f"transformer.{name}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) * std
        )
        tensors[f"transformer.{name}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * std
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
