"""The tiny FLUX.2 pipeline as tests and benchmarks use it: loaded like the worker loads it, and one
fixed render to compare images by."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from pipeline.tiny import ensure_tiny_pipeline


def load_tiny(cache_dir: Path) -> Flux2Pipeline:
    """A fresh tiny pipeline in float32 from the build cache under `cache_dir` (built there if missing)."""
    pipe = Flux2Pipeline.from_pretrained(ensure_tiny_pipeline(cache_dir / "tiny"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
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
