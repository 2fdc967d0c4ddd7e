"""The safety checker: an image classifier run on every output unless the request turns it off.

A flagged image is replaced by a black image of the same size, and its `has_nsfw_concepts` entry is true.
The model comes from models.yaml (FLUX.2's reference choice, `Falconsai/nsfw_image_detection`, labels
normal/nsfw, flagged above 0.85); the tiny variant is a random ViT with the same labels, built offline.
If the checker cannot load, the worker does not start: images are never served unchecked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from pipeline.models import HubSafetyChecker, TinySafetyChecker

NSFW_LABEL = "nsfw"
TINY_CHECKER_VERSION = 1


class SafetyChecker:
    def __init__(
        self, spec: HubSafetyChecker | TinySafetyChecker, cache_dir: Path, device: torch.device
    ) -> None:
        source, kwargs = _source(spec, cache_dir)
        self.processor = AutoImageProcessor.from_pretrained(source, **kwargs)  # type: ignore[no-untyped-call]
        self.model = AutoModelForImageClassification.from_pretrained(source, **kwargs).to(device).eval()
        labels = {str(label).lower(): index for index, label in self.model.config.id2label.items()}
        if NSFW_LABEL not in labels:
            raise ValueError(
                f"safety checker {source} has no {NSFW_LABEL!r} label (labels: {sorted(labels)})"
            )
        self.nsfw_index = labels[NSFW_LABEL]
        self.threshold = spec.threshold
        self.device = device

    def scores(self, images: list[Image.Image]) -> list[float]:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**inputs.to(self.device)).logits.float()
        return [float(p) for p in logits.softmax(-1)[:, self.nsfw_index]]

    def screen(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """The images to serve (flagged ones blacked out) and which were flagged."""
        flags = [score > self.threshold for score in self.scores(images)]
        served = [
            Image.new("RGB", image.size) if flagged else image
            for image, flagged in zip(images, flags, strict=True)
        ]
        return served, flags


def _source(spec: HubSafetyChecker | TinySafetyChecker, cache_dir: Path) -> tuple[str, dict[str, str]]:
    if isinstance(spec, TinySafetyChecker):
        return str(ensure_tiny_checker(cache_dir / "tiny")), {}
    if spec.local_dir is not None:
        return str(spec.local_dir), {}
    return spec.repo_id, {"revision": spec.revision}


def ensure_tiny_checker(cache_root: Path) -> Path:
    """A random ViT classifier with labels normal/nsfw, saved once and loaded like the real one."""
    folder = cache_root / f"safety-checker-v{TINY_CHECKER_VERSION}"
    if (folder / "config.json").exists():
        return folder
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "normal", 1: NSFW_LABEL},
        label2id={"normal": 0, NSFW_LABEL: 1},
    )
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    ViTForImageClassification(config).save_pretrained(partial)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(partial)
    partial.rename(folder)
    return folder
