"""Loading a Flux2Pipeline for a registry entry, onto the device that will own it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from pipeline.models import HubModel, TinyModel

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Every FLUX.2 [dev] weight in bf16 (transformer 64.4 GB + text encoder 48 GB + VAE) plus activations.
# Below this much device memory the pipeline is offloaded component by component instead.
_FULL_RESIDENCY_BYTES = 125 * 1024**3


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# diffusers 0.42 passes tokenizer options to transformers 5's apply_chat_template the old way, which warns
# on every prompt; harmless, and it would drown the server's own log.
logging.getLogger("transformers.processing_utils").addFilter(_DropMessage("have to be in `processor_kwargs`"))


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


def _source_folder(spec: HubModel | TinyModel, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Where from_pretrained reads: a local folder, or a hub id resolved through huggingface_hub's cache."""
    if isinstance(spec, TinyModel):
        from pipeline.tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline(cache_dir / "tiny", seed=spec.seed)), {}
    if spec.local_dir is not None:
        return str(spec.local_dir), {}
    return spec.repo_id, {"revision": spec.revision}


def load_pipeline(spec: HubModel | TinyModel, cache_dir: Path) -> tuple[Flux2Pipeline, torch.device]:
    device = resolve_device(spec)
    _quiet_progress_bars()
    source, hub_kwargs = _source_folder(spec, cache_dir)
    log.info("loading model %r from %s (%s on %s)", spec.name, source, spec.dtype, device)
    pipe = Flux2Pipeline.from_pretrained(source, dtype=_DTYPES[spec.dtype], **hub_kwargs)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    if (
        device.type == "cuda"
        and torch.cuda.get_device_properties(device).total_memory < _FULL_RESIDENCY_BYTES
    ):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe, device
