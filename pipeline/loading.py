"""Loading a Flux2Pipeline for a registry entry, onto the device that will own it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from pipeline.models import ConfigError, HubModel, MemoryProfile, Quantization, TinyModel

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FP8_MATMUL_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell: FP8 tensor cores
_TEXT_ENCODER_IMAGE_SIDE = ("model.vision_tower", "model.multi_modal_projector")


def _quiet_progress_bars() -> None:
    """Loading bars are for notebooks; in a server log they are noise, and they break JSON log lines."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def resolve_device(spec: HubModel | TinyModel) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model {spec.name!r} asks for device cuda, but no CUDA device is available")
    return torch.device(spec.device)


def device_memory_bytes(device: torch.device) -> int:
    """What a memory profile is chosen by: the GPU's memory, or the machine's for a CPU model."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _torchao_config(kind: Quantization, component: str, device: torch.device) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    if kind == "int8":
        return Int8WeightOnlyConfig()
    fp8_matmuls = device.type == "cuda" and torch.cuda.get_device_capability(device) >= _FP8_MATMUL_CAPABILITY
    if component == "transformer" and fp8_matmuls:
        return Float8DynamicActivationFloat8WeightConfig()  # FP8 GEMMs: the transformer is where time goes
    if component == "transformer" and device.type == "cuda":
        log.warning("this GPU has no FP8 matmuls (compute capability < 8.9): FP8 weights, bf16 compute")
    return Float8WeightOnlyConfig()  # halves the memory; the text encoder runs once per new prompt


def quantization_config(profile: MemoryProfile, device: torch.device) -> Any:
    """diffusers' PipelineQuantizationConfig for the profile, or None when nothing is quantized."""
    import diffusers
    import transformers
    from diffusers.quantizers.pipe_quant_config import PipelineQuantizationConfig

    mapping: dict[str, Any] = {}
    for component, kind in (("transformer", profile.transformer), ("text_encoder", profile.text_encoder)):
        library = diffusers if component == "transformer" else transformers
        if kind == "nf4":
            if device.type != "cuda":
                raise ConfigError(f"memory profile {profile.name!r}: 4-bit (nf4) weights need a CUDA GPU")
            mapping[component] = library.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        elif kind != "none":
            # Mistral3's image side never sees a text prompt: leave it as loaded.
            extra = {} if library is diffusers else {"modules_to_not_convert": list(_TEXT_ENCODER_IMAGE_SIDE)}
            mapping[component] = library.TorchAoConfig(_torchao_config(kind, component, device), **extra)
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def _source_folder(spec: HubModel | TinyModel, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Where from_pretrained reads: a local folder, or a hub id resolved through huggingface_hub's cache."""
    if isinstance(spec, TinyModel):
        from pipeline.tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline(cache_dir / "tiny", seed=spec.seed)), {}
    if spec.local_dir is not None:
        return str(spec.local_dir), {}
    return spec.repo_id, {"revision": spec.revision}


@dataclass(frozen=True)
class LoadedPipeline:
    pipe: Flux2Pipeline
    device: torch.device
    dtype: torch.dtype  # the compute dtype (quantized weights are computed in it too)
    profile: MemoryProfile


def load_pipeline(
    spec: HubModel | TinyModel, cache_dir: Path, profile_name: str | None = None
) -> LoadedPipeline:
    """Loads the model under the memory profile that fits the device (or the one named); a ConfigError,
    before any weight is read, when none fits."""
    device = resolve_device(spec)
    profile = spec.memory_profile(device_memory_bytes(device), profile_name)
    quantization = quantization_config(profile, device)
    _quiet_progress_bars()
    source, hub_kwargs = _source_folder(spec, cache_dir)
    log.info(
        "loading model %r from %s (%s on %s, memory profile %r)",
        spec.name,
        source,
        spec.dtype,
        device,
        profile.name,
    )
    # Offloaded components live in CPU memory; the others load (and quantize) straight onto the device,
    # so the machine never holds a second copy of the weights. On a CPU everything is in CPU memory anyway.
    offload = profile.offload == "model" and device.type == "cuda"
    placement = {} if offload else {"device_map": device.type}
    pipe = Flux2Pipeline.from_pretrained(
        source, dtype=_DTYPES[spec.dtype], quantization_config=quantization, **placement, **hub_kwargs
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    return LoadedPipeline(pipe, device, _DTYPES[spec.dtype], profile)
