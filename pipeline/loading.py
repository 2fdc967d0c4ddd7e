"""Loading a Flux2Pipeline for a registry entry, onto the device that will own it."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.quantizers.pipe_quant_config import PipelineQuantizationConfig

from pipeline.models import ConfigError, HubModel, MemoryProfile, Quantization, TinyModel

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FP8_MATMUL_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell: FP8 tensor cores
TEXT_ENCODER_IMAGE_SIDE = ("model.vision_tower", "model.multi_modal_projector")


def quiet_progress_bars() -> None:
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


def quantization_configs(profile: MemoryProfile, device: torch.device) -> dict[str, Any]:
    """Each quantized component's diffusers/transformers quantization config under the profile."""
    import diffusers
    import transformers

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
            extra = {} if library is diffusers else {"modules_to_not_convert": list(TEXT_ENCODER_IMAGE_SIDE)}
            mapping[component] = library.TorchAoConfig(_torchao_config(kind, component, device), **extra)
    return mapping


def _text_encoder_config(folder: Path) -> Any:
    """The text encoder's config as its checkpoint is loaded. FLUX.2 [dev]'s was written by transformers
    4.57, which read `tie_word_embeddings` from `text_config` (false: Mistral Small has its own output
    projection). Newer Mistral3Configs default the top-level flag to true: a model built from the config
    alone would share `lm_head` with the input embeddings, while `from_pretrained` keeps the checkpoint's
    own (a test holds both)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder / "text_encoder")
    config.tie_word_embeddings = config.get_text_config().tie_word_embeddings
    return config


def _source_folder(spec: HubModel | TinyModel, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Where from_pretrained reads: a local folder, or a hub id resolved through huggingface_hub's cache."""
    if isinstance(spec, TinyModel):
        from pipeline.tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline(cache_dir / "tiny", seed=spec.seed)), {}
    if spec.local_dir is not None:
        return str(spec.local_dir), {}
    return spec.repo_id, {"revision": spec.revision}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(folder: Path, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The model components of a diffusers folder, made from their configs alone, no weight read: the
    classes `from_pretrained` builds, in `dtype`, with constructor-initialised (random) tensors wherever
    the caller's device context puts them (`torch.device("meta")` to count bytes, a GPU for checks)."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components: dict[str, torch.nn.Module] = {}
    with default_dtype(dtype):
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list):
                continue
            library, class_name = entry
            cls: Any = getattr(importlib.import_module(library), class_name)
            if not issubclass(cls, torch.nn.Module):
                continue  # the scheduler and the processor hold no tensors
            if library == "diffusers":
                # Keys an older diffusers wrote that this one no longer takes (FLUX.2's `force_upcast`)
                # would only be warned about: leave them out.
                config = cls.load_config(folder / name)
                accepted = inspect.signature(cls.__init__).parameters
                components[name] = cls.from_config({k: v for k, v in config.items() if k in accepted})
            else:
                components[name] = cls._from_config(_text_encoder_config(folder), dtype=dtype)
    return components


def quantize_built(
    components: dict[str, torch.nn.Module], profile: MemoryProfile, device: torch.device
) -> None:
    """Quantizes components built by `build_components` (on `device`) in place as the profile's loading
    would: torchao with the loader's own configs, bitsandbytes' NF4 Linear layers on a GPU. For checks on
    random weights (scripts/gpu_check); a real model is quantized while it loads."""
    from pipeline.memory import quantized_linear_names

    configs = quantization_configs(profile, device)
    for name, kind in (("transformer", profile.transformer), ("text_encoder", profile.text_encoder)):
        if kind == "none":
            continue
        model = components[name]
        names = set(quantized_linear_names(model, name, kind))
        if kind == "nf4":
            _to_nf4(model, names, device)
        else:
            from torchao.quantization import quantize_

            quantize_(
                model,
                configs[name].quant_type,
                filter_fn=lambda _, module_name, chosen=names: module_name in chosen,
            )


def _to_nf4(model: torch.nn.Module, names: set[str], device: torch.device) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")  # untyped
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4").to(
            device
        )
        if linear.bias is not None:
            quantized.bias = linear.bias
        setattr(parent, child, quantized)


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
    quantization = quantization_configs(profile, device)
    quiet_progress_bars()
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
    dtype = _DTYPES[spec.dtype]
    pipe = Flux2Pipeline.from_pretrained(
        source,
        dtype=dtype,
        quantization_config=PipelineQuantizationConfig(quant_mapping=quantization) if quantization else None,
        **placement,
        **hub_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    return LoadedPipeline(pipe, device, dtype, profile)
