"""FLUX.2 [dev]'s device memory per memory profile, accounted from its real configs (tests/fixtures/flux2-dev)
on the meta device and on fake tensors: nothing is allocated, it runs in about a minute on a CPU.

Prints, per profile, the weights as held, the LoRA slots, the prompt cache's budget, the activations' peak
for text-to-image with 1-4 images and for an edit with 4 references, and the device total with the
minimum the profile needs (what models.yaml's `min_device_memory_gib` must say; a test holds them equal).

    .venv/bin/python scripts/memory_account.py [--rank 128] [--slots 3] [--prompt-cache-gib 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pipeline  # noqa: F401  # first: importing it silences the noise diffusers makes at import

# isort: split
import torch
from transformers import ViTConfig, ViTForImageClassification

from pipeline.memory import GiB, Workload, account, activation_peaks
from pipeline.models import PACKAGED_REGISTRY, load_registry

REAL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "flux2-dev"
WORKLOADS = {
    "1 image": Workload(images=1),
    "2 images": Workload(images=2),
    "4 images": Workload(images=4),
    "edit, 4 refs": Workload(images=1, references=4),
    "edit, 4 refs, 4 images": Workload(images=4, references=4),
}


def gib(size: int) -> str:
    return f"{size / GiB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=128, help="LoRA slot rank (FLUX2_MAX_LORA_RANK)")
    parser.add_argument("--slots", type=int, default=3, help="LoRA slots (FLUX2_LORA_SLOTS)")
    parser.add_argument("--prompt-cache-gib", type=float, default=1.0, help="prompt cache budget")
    args = parser.parse_args()

    peaks = {label: activation_peaks(REAL, torch.bfloat16, workload) for label, workload in WORKLOADS.items()}
    print("activations' peak per component, GiB (bf16, 1024x1024):")
    print("| workload | text encoder | transformer | VAE |")
    print("|---|---|---|---|")
    for label, peak in peaks.items():
        print(f"| {label} | {gib(peak['text_encoder'])} | {gib(peak['transformer'])} | {gib(peak['vae'])} |")

    with torch.device("meta"):
        checker = ViTForImageClassification(ViTConfig(num_labels=2))  # Falconsai's: ViT-base/16, float32
    spec = load_registry(PACKAGED_REGISTRY).get("flux2-dev")
    cache = f"{args.prompt_cache_gib:g} GiB prompt cache"
    print(f"\nper profile, GiB ({args.slots} LoRA slots at rank {args.rank}, {cache}):")
    columns = ("transformer", "text encoder", "VAE", "checker", "LoRA slots", "4 images", "edit 4 refs")
    print("| profile | " + " | ".join(columns) + " | needs | models.yaml |")
    print("|---" * (len(columns) + 3) + "|")
    for name, profile in spec.memory_profiles.items():
        common = {
            "lora_slots": args.slots,
            "lora_rank": args.rank,
            "prompt_cache_bytes": int(args.prompt_cache_gib * GiB),
            "safety_checker": checker,
        }
        four = account(REAL, profile, workload=WORKLOADS["4 images"], activations=peaks["4 images"], **common)
        edit = account(
            REAL, profile, workload=WORKLOADS["edit, 4 refs"], activations=peaks["edit, 4 refs"], **common
        )
        w = four.weights
        print(
            f"| {name} | {gib(w['transformer'])} | {gib(w['text_encoder'])} | {gib(w['vae'])} |"
            f" {gib(w['safety_checker'])} | {gib(four.lora_slots)} | {gib(four.device_bytes)} |"
            f" {gib(edit.device_bytes)} | {four.min_device_memory_gib} | {profile.min_device_memory_gib:g} |"
        )


if __name__ == "__main__":
    main()
