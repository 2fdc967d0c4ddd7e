"""Device memory, accounted from a model folder's configs before any weight exists.

Every component is built on the meta device from its config (`loading.build_components`: the classes that
`from_pretrained` builds), and counted as a memory profile holds it. Linear weights the profile quantizes
are quantized on the meta device by torchao itself (fp8, int8), or counted in bitsandbytes' NF4 layout
(bitsandbytes quantizes on a GPU only): 4-bit codes, one float32 absmax per 64 weights, a 16-value code
book. In the text encoder, torchao leaves the image side as loaded (`loading.TEXT_ENCODER_IMAGE_SIDE`),
bitsandbytes the output projection (`lm_head`).

Beside the weights: the LoRA slots (every Linear, rank R, A and B, in the compute dtype), the prompt
cache's budget (its entries live on the device), and the activations' peak for the largest request,
found by running each component on fake tensors under torch's `MemTracker` (shapes and lifetimes without
any arithmetic). Only the CUDA context, library workspaces and the allocator's slack are an allowance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.loading import TEXT_ENCODER_IMAGE_SIDE, build_components, default_dtype
from pipeline.models import MemoryProfile, Quantization

GiB = 1024**3
# The CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation: not computable from
# configs. About 1 GiB is the context and workspaces on a Hopper GPU; the rest is slack. gpu_check
# measures the real peak against this account.
DEVICE_OVERHEAD_BYTES = 2 * GiB
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (diffusers' and transformers' BitsAndBytesConfig default)
TEXT_TOKENS = 512  # Flux2Pipeline pads every prompt to this many tokens
PATCH_PIXELS = 16  # one image token per 16x16 pixels: the VAE's 8x, then the pipeline's 2x2 patchify
OFFLOADED = ("text_encoder", "transformer", "vae")  # what model offload moves to the device in turn


@dataclass(frozen=True)
class Workload:
    """The largest request the account must hold: `images` outputs of `side`² pixels, or an edit with
    `references` images of about `side`² each (reference latents lengthen the transformer's sequence)."""

    images: int = 4
    side: int = 1024
    references: int = 0


@dataclass(frozen=True)
class MemoryAccount:
    """Bytes a loaded model holds under one memory profile; `device_bytes` is its peak on the device."""

    profile: str
    weights: Mapping[str, int]  # per component, as held (quantized or not)
    lora_slots: int
    prompt_cache: int
    activations: Mapping[str, int] = field(default_factory=dict)  # peak per component, largest workload
    offload: bool = False  # components move to the device one at a time
    overhead: int = DEVICE_OVERHEAD_BYTES

    @property
    def device_bytes(self) -> int:
        if not self.offload:
            resident = sum(self.weights.values()) + self.lora_slots
            return resident + self.prompt_cache + max(self.activations.values(), default=0) + self.overhead
        # One offloaded component on the device at a time (the transformer with its slots); the safety
        # checker stays there.
        always = sum(size for name, size in self.weights.items() if name not in OFFLOADED)
        turns = [
            self.weights[name]
            + self.activations.get(name, 0)
            + (self.lora_slots if name == "transformer" else 0)
            for name in OFFLOADED
            if name in self.weights
        ]
        return always + max(turns) + self.prompt_cache + self.overhead

    @property
    def min_device_memory_gib(self) -> int:
        return math.ceil(self.device_bytes / GiB)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage a tensor holds, looking inside tensor subclasses (torchao's quantized weights), and
    bitsandbytes' 4-bit quantization state."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(part) for part in inner if part is not None)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes' Params4bit
    if state is not None:
        size += sum(part.numel() * part.element_size() for part in (state.absmax, state.code))
    return size


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers of a module, each storage once (tied weights are one storage)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def nf4_bytes(elements: int) -> int:
    """bitsandbytes' NF4 storage of one weight: packed 4-bit codes, a float32 absmax per block, the code
    book."""
    return (elements + 1) // 2 + 4 * math.ceil(elements / NF4_BLOCK) + 4 * 16


def quantized_linear_names(model: torch.nn.Module, component: str, kind: Quantization) -> list[str]:
    """The Linear modules the loading libraries quantize in `component` for `kind`: in the text encoder,
    torchao skips only the image side this project names (naming any skips replaces transformers' own);
    bitsandbytes, given none, skips transformers' default: the output projection."""
    skipped: tuple[str, ...] = ()
    if component == "text_encoder":
        skipped = ("lm_head",) if kind == "nf4" else TEXT_ENCODER_IMAGE_SIDE
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith(skipped)
    ]


def quantized_bytes(model: torch.nn.Module, component: str, kind: Quantization) -> int:
    """A meta-device component's bytes once the profile has quantized it (the model is changed in place)."""
    if kind == "none":
        return module_bytes(model)
    names = set(quantized_linear_names(model, component, kind))
    if kind == "nf4":
        linears = [module for name, module in model.named_modules() if name in names]
        replaced = sum(tensor_bytes(linear.weight) for linear in linears)
        return module_bytes(model) - replaced + sum(nf4_bytes(linear.weight.numel()) for linear in linears)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    # Weight-only FP8 stores a float32 scale per output row; the FP8-matmul variant a GPU with FP8 tensor
    # cores gets stores one per tensor: at most 4 bytes per row less, a few MB on FLUX.2.
    config = Float8WeightOnlyConfig() if kind == "fp8" else Int8WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda module, name: name in names)
    return module_bytes(model)


def held_account(
    components: Mapping[str, torch.nn.Module], profile: MemoryProfile, prompt_cache_bytes: int
) -> MemoryAccount:
    """The account of a loaded model, from its modules as they are (LoRA slots counted apart from the
    transformer's weights): what `/ready` reports, and what the account from configs must equal."""
    from peft.tuners.lora import LoraLayer

    weights = {name: module_bytes(module) for name, module in components.items()}
    slots = 0
    for layer in components["transformer"].modules():
        if isinstance(layer, LoraLayer):
            slots += sum(
                module_bytes(adapter) for adapter in [*layer.lora_A.values(), *layer.lora_B.values()]
            )
    weights["transformer"] -= slots
    return MemoryAccount(profile.name, weights, slots, prompt_cache_bytes, offload=profile.offload == "model")


def lora_device_budget(device: torch.device, profile: MemoryProfile, device_memory: int | None = None) -> int:
    """Bytes for the device tier of recently used LoRAs: half of what the profile leaves free on this GPU
    (`device_memory`, or all it has; the profile's minimum already holds the largest text-to-image request),
    kept for edits with many references. 0 on a CPU (host memory is the device) or with offload (the slots
    leave the GPU between turns)."""
    if device.type != "cuda" or profile.offload != "none":
        return 0
    total = device_memory or torch.cuda.get_device_properties(device).total_memory
    return max(0, int(total - profile.min_device_memory_gib * GiB) // 2)


def lora_slot_bytes(transformer: torch.nn.Module, slots: int, rank: int, dtype: torch.dtype) -> int:
    """`slots` adapters of rank `rank` on every Linear (as `LoraSlots` makes them): A (r, in), B (out, r)."""
    per_rank = sum(
        m.in_features + m.out_features for m in transformer.modules() if isinstance(m, torch.nn.Linear)
    )
    return slots * rank * per_rank * torch.finfo(dtype).bits // 8


def activation_peaks(folder: Path, dtype: torch.dtype, workload: Workload) -> dict[str, int]:
    """Each component's peak of activation bytes for `workload`, run on fake tensors (no arithmetic, no
    memory) under torch's MemTracker; the weights are not counted here."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    peaks: dict[str, int] = {}
    with FakeTensorMode(), default_dtype(dtype), torch.device("cpu"):
        components = build_components(folder, dtype)
        for name, run in _component_runs(components, workload).items():
            tracker = MemTracker()
            tracker.track_external(components[name])
            with tracker, torch.inference_mode():
                run()
            peak = tracker.get_tracker_snapshot("peak")
            peaks[name] = max(int(stats["Activation"] + stats["Temp"]) for stats in peak.values())
    return peaks


def _component_runs(components: Mapping[str, torch.nn.Module], workload: Workload) -> dict[str, Any]:
    """One call per component as Flux2Pipeline makes it for `workload` (inputs made inside the tracker)."""
    transformer: Any = components["transformer"]
    vae: Any = components["vae"]
    text_encoder = components["text_encoder"]
    n, side = workload.images, workload.side
    tokens = (side // PATCH_PIXELS) ** 2
    sequence = tokens * (1 + workload.references)  # reference latents are appended to the image tokens
    latent_side = side // 8

    def encode_prompt() -> None:
        ids = torch.ones(1, TEXT_TOKENS, dtype=torch.int64)
        text_encoder(input_ids=ids, attention_mask=ids, output_hidden_states=True, use_cache=False)

    def denoise() -> None:
        transformer(
            hidden_states=torch.randn(n, sequence, transformer.config.in_channels),
            encoder_hidden_states=torch.randn(n, TEXT_TOKENS, transformer.config.joint_attention_dim),
            timestep=torch.ones(n),
            img_ids=torch.zeros(n, sequence, 4, dtype=torch.int64),
            txt_ids=torch.zeros(n, TEXT_TOKENS, 4, dtype=torch.int64),
            guidance=torch.ones(n),
            return_dict=False,
        )

    def decode() -> None:
        vae.decode(torch.randn(n, vae.config.latent_channels, latent_side, latent_side), return_dict=False)
        if workload.references:  # each reference is encoded on its own
            vae.encode(torch.randn(1, 3, side, side), return_dict=False)

    return {"text_encoder": encode_prompt, "transformer": denoise, "vae": decode}


def account(
    folder: Path,
    profile: MemoryProfile,
    *,
    dtype: torch.dtype = torch.bfloat16,
    lora_slots: int = 3,
    lora_rank: int = 128,
    prompt_cache_bytes: int = GiB,
    workload: Workload | None = None,
    safety_checker: torch.nn.Module | None = None,
    activations: Mapping[str, int] | None = None,
) -> MemoryAccount:
    """The memory account of the model in `folder` under `profile`; `workload=None` leaves out activations
    (what `/ready` reports: what is held, not what a request adds). Activations do not depend on the
    profile: `activations` passes ones already computed for `workload`."""
    quantization = {"transformer": profile.transformer, "text_encoder": profile.text_encoder}
    with torch.device("meta"):
        components = build_components(folder, dtype)
        slots = lora_slot_bytes(components["transformer"], lora_slots, lora_rank, dtype)
        weights = {
            name: quantized_bytes(module, name, quantization.get(name, "none"))
            for name, module in components.items()
        }
    if safety_checker is not None:
        weights["safety_checker"] = module_bytes(safety_checker)
    if activations is None:
        activations = activation_peaks(folder, dtype, workload) if workload else {}
    return MemoryAccount(
        profile.name,
        weights,
        slots,
        prompt_cache_bytes,
        dict(activations),
        offload=profile.offload == "model",
    )
