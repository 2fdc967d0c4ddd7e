"""fal's `acceleration` presets, all served by the one loaded transformer.

- `none`: eager PyTorch. On a compiled transformer the compiled code is bypassed with
  `torch.compiler.set_stance("force_eager")`, which runs the same modules uncompiled, bit for bit as a
  transformer that was never compiled, and recompiles nothing on the way back.
- `regular`: the transformer's repeated blocks compiled (`fullgraph=True`), once at startup, and warmed
  for fal's preset sizes; the fastest exact attention backend the device has.
- `high`: `regular` plus a TaylorSeer step cache: after the first quarter of the steps, two of every three
  steps skip every transformer block and extrapolate the model's output to first order from the last
  computed steps; the last two steps are computed in full.

Why each block's `forward` is compiled rather than the module (`compile_repeated_blocks` compiles
`Module.__call__`): diffusers' cache hooks replace the blocks' `forward`, so compiling the module would
trace the hooks' per-step Python state and recompile every step. Compiling the forward underneath keeps the
hooks in Python around the compiled code: adding and removing them per request changes no graph. Blocks of
one class share their compiled graphs (modules' parameters are graph inputs), as in regional compilation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

import torch
from diffusers import TaylorSeerCacheConfig

log = logging.getLogger(__name__)

Preset = Literal["none", "regular", "high"]
PRESETS: tuple[Preset, ...] = ("none", "regular", "high")

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# Exact attention kernels from their own packages, fastest first; then cuDNN's, then PyTorch's SDPA.
# Approximate ones (SageAttention's int8) are never picked unasked.
_FLASH_BACKENDS = ("_flash_3", "flash")

# TaylorSeer in FLUX.2's terms (see the module docstring).
_CACHE_INTERVAL = 3
_FULL_STEPS_AT_END = 2
_MIN_FULL_STEPS_AT_START = 3


def keep_compiled_code_in(cache_dir: Path) -> Path:
    """Inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels, autotuning) go under the server's
    cache folder instead of /tmp: a restart, or a container whose image or volume carries the folder, loads
    the compiled code instead of generating it again (dynamo still traces; inductor's code generation and
    the C++/Triton builds are what it saves). An operator's own TORCHINDUCTOR_CACHE_DIR is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing torch's libraries writes /tmp's default into the variable: that one is not an operator's.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "torch-compile")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def step_cache_config(steps: int) -> TaylorSeerCacheConfig | None:
    """The `high` preset's TaylorSeer settings for a run of `steps`, or None when it would skip nothing."""
    start = max(_MIN_FULL_STEPS_AT_START, steps // 4)
    end = steps - _FULL_STEPS_AT_END
    if end - start < 2:  # no step would be predicted
        return None
    return TaylorSeerCacheConfig(  # type: ignore[no-untyped-call]
        cache_interval=_CACHE_INTERVAL,
        disable_cache_before_step=start,
        disable_cache_after_step=end,
        max_order=1,
        taylor_factors_dtype=torch.float32,  # only the model's output is kept: precision is cheap here
        use_lite_mode=True,  # blocks skipped outright, the output predicted: no per-block state
    )


def choose_attention_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend to use: `requested` if given, else the first exact backend this device can run."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    if requested:
        _check_attention_backend_requirements(AttentionBackendName(requested))
        return requested
    if device.type != "cuda":
        return "native"
    for name in _FLASH_BACKENDS:
        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
        except RuntimeError:  # its package is not installed
            continue
        return name
    cudnn = torch.backends.cudnn.is_available()  # type: ignore[no-untyped-call]
    if cudnn and torch.cuda.get_device_capability(device) >= (8, 0):  # cuDNN's fused attention
        return "_native_cudnn"
    return "native"


class Accelerator:
    """Runs the presets on one transformer: `compile()` once at startup, then `preset(...)` per request."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.compiled = False
        self.attention_backend = "native"

    def set_attention_backend(self, backend: str) -> None:
        if backend != "native":  # diffusers' default; setting it anyway only logs an "experimental" warning
            self.transformer.set_attention_backend(backend)  # type: ignore[operator]
        self.attention_backend = backend

    def compile(self) -> None:
        """Compile every repeated block's forward; graphs are built on the first calls (see `warm_up`)."""
        for list_name in _BLOCK_LISTS:
            for block in getattr(self.transformer, list_name):
                block.forward = torch.compile(block.forward, fullgraph=True)
        self.compiled = True

    @contextmanager
    def preset(self, name: Preset, steps: int) -> Iterator[None]:
        """Run the pipeline call inside this to get preset `name` for a run of `steps` denoising steps."""
        transformer = self.transformer
        with ExitStack() as stack:
            if name == "none" and self.compiled:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            cache = step_cache_config(steps) if name == "high" else None
            if cache is not None:
                transformer.enable_cache(cache)  # type: ignore[operator]
                stack.callback(transformer.disable_cache)  # type: ignore[arg-type]
            # Flux2Pipeline never opens a cache context itself; the hooks keep their state under it.
            stack.enter_context(transformer.cache_context("cond"))  # type: ignore[operator]
            yield
