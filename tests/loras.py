"""LoRA files for the tiny transformer, written in diffusers form with random weights (test helper)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


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
