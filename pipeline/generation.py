"""One generation: a validated request in, encoded images out, progress reported per denoising step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from PIL import Image

from pipeline.acceleration import PRESETS, Accelerator, Preset
from pipeline.errors import Cancelled, InvalidInput
from pipeline.images import encode_image
from pipeline.lora_cache import LoraMemoryCache
from pipeline.lora_device_tier import LoraDeviceTier
from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraFitError, LoraSlots, ParsedLora
from pipeline.lycoris import LycorisPolicy
from pipeline.messages import GenerationParams, Job, JobSucceeded, ResolvedLora
from pipeline.prompt_cache import PromptEmbeddingCache
from pipeline.safety import SafetyChecker

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
NoteCallback = Callable[[str], None]

MAX_SEQUENCE_LENGTH = 512  # Flux2Pipeline's defaults, named so the prompt cache can key on them
TEXT_ENCODER_OUT_LAYERS = (10, 20, 30)
EXPANSION_TEMPERATURE = 0.15  # diffusers' recommended caption-upsampling temperature for FLUX.2
SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes any unsigned 64-bit seed


def seed_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed, seed+1, ...

    Image k of a batch is therefore the same noise as a single-image request with seed+k, and CPU
    generators give the same starting noise on every GPU model.
    """
    return [torch.Generator(device="cpu").manual_seed((seed + k) % SEED_MODULUS) for k in range(count)]


def pipeline_kwargs(params: GenerationParams, images: Sequence[Image.Image] = ()) -> dict[str, Any]:
    """The exact Flux2Pipeline arguments for a request (and its reference images, for an edit); tests call
    the pipeline directly with these."""
    return {
        **({"image": list(images)} if images else {}),
        "prompt": params.prompt,
        "height": params.height,
        "width": params.width,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": float(params.guidance_scale),
        "num_images_per_prompt": params.num_images,
        "generator": seed_generators(params.seed, params.num_images),
        "output_type": "pil",
    }


def open_reference(path: str) -> Image.Image:
    """A reference image as the HTTP side stored it (RGB), loaded whole before the file may go."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _pinned(parsed: ParsedLora) -> ParsedLora:
    """With a GPU, the cached copy lives in page-locked memory: each later switch copies it to the slots
    asynchronously and at full bus speed, instead of through a staging buffer."""
    if not torch.cuda.is_available():
        return parsed
    return replace(parsed, state_dict={key: tensor.pin_memory() for key, tensor in parsed.state_dict.items()})


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InvalidInput(f"acceleration must be one of {', '.join(PRESETS)}", loc=("acceleration",))
    return name


class ImageGenerator:
    """Owns the loaded pipeline and its LoRA slots; runs one request at a time."""

    def __init__(
        self,
        pipe: Flux2Pipeline,
        slots: LoraSlots,
        lora_cache: LoraMemoryCache,
        safety: SafetyChecker,
        prompt_cache: PromptEmbeddingCache | None = None,
        accelerator: Accelerator | None = None,
        lycoris_truncate: bool = False,
        lora_device_bytes: int = 0,
    ) -> None:
        self.pipe = pipe
        self.accelerator = accelerator or Accelerator(pipe.transformer)
        self.prompt_cache = prompt_cache or PromptEmbeddingCache(max_bytes=0)
        self.slots = slots
        self.lora_cache = lora_cache
        # Recently used LoRAs on the slots' device too (0 bytes: none), ahead of the host-memory cache.
        self.lora_tier = LoraDeviceTier(lora_device_bytes, slots.device, slots.dtype)
        self.safety = safety
        self.lycoris = LycorisPolicy(slots.max_rank, lycoris_truncate)
        self.last_lora_switch_seconds = 0.0

    def expand_prompt(self, prompt: str, seed: int, images: Sequence[Image.Image] = ()) -> str:
        """The prompt rewritten by the pipeline's own text encoder (FLUX.2's caption upsampling), looking
        at the reference images of an edit.

        `generate` samples from torch's global generator, so it is seeded from the request, inside a forked
        RNG state: the same request expands the same way, and nothing else's randomness moves. The images
        go in as one prompt's list: `upsample_prompt` reads a flat list as one image per prompt (and
        `Flux2Pipeline.__call__` passes it flat, which fails for two or more references).
        """
        devices = [self.pipe.text_encoder.device] if self.pipe.text_encoder.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed % 2**63)
            expanded = self.pipe.upsample_prompt(
                prompt,
                images=[list(images)] if images else None,  # type: ignore[arg-type]  # diffusers' hint is wrong
                temperature=EXPANSION_TEMPERATURE,
            )[0].strip()
        return expanded or prompt  # a model that says nothing leaves the prompt as it was

    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        """The text encoder's output for one prompt, from the cache when it was seen before.

        Passing these as `prompt_embeds` is exactly what the pipeline does with `prompt=` (it encodes, then
        repeats per image), so the image is the same bit for bit.
        """
        key = (prompt, MAX_SEQUENCE_LENGTH, TEXT_ENCODER_OUT_LAYERS)

        def encode() -> torch.Tensor:
            embeds, _ = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.pipe._execution_device,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS,  # type: ignore[arg-type]  # diffusers' hint is wrong
            )
            assert isinstance(embeds, torch.Tensor)
            return embeds

        return self.prompt_cache.get(key, encode)

    def apply_loras(self, loras: tuple[ResolvedLora, ...]) -> list[str]:
        """Puts the request's LoRAs into the slots (and empties the others); a refusal changes no slot.
        Returns what reading them changed that the user should know."""
        started = time.perf_counter()
        try:
            parsed = [(self._parsed(index, lora), lora.scale) for index, lora in enumerate(loras)]
            self.slots.apply(parsed)
            self.last_lora_switch_seconds = time.perf_counter() - started
        except LoraFitError as exc:
            loc: tuple[str | int, ...] = ("loras",) if exc.index is None else ("loras", exc.index, "path")
            raise InvalidInput(str(exc), loc=loc) from exc
        return [
            f"LoRA {i} ({lora.name}): {note}" for i, (lora, _) in enumerate(parsed) for note in lora.notes
        ]

    def _parsed(self, index: int, lora: ResolvedLora) -> ParsedLora:
        try:
            parsed = self.lora_cache.get(
                lora.sha256, lambda: _pinned(read_lora_file(Path(lora.file), lora.source, self.lycoris))
            )
        except LoraFitError as exc:
            exc.index = index
            raise
        return self.lora_tier.resident(lora.sha256, parsed)

    def warm_up(self, sizes: tuple[tuple[int, int], ...]) -> None:
        """Build the compiled graphs now rather than on the first requests: one denoising step at each
        (width, height), then two images at once. After the second distinct shape dynamo makes the changed
        dimension dynamic, so these few graphs then serve every size and batch without recompiling, and
        edits too: reference latents only lengthen the sequence the blocks see (tested with
        `error_on_recompile` across 1-4 references)."""
        embeds = self.prompt_embeds("")
        runs = [(width, height, 1) for width, height in sizes] + [(*sizes[0], 2)] if sizes else []
        with torch.inference_mode(), self.accelerator.preset("regular", 1):
            for width, height, count in runs:
                self.pipe(
                    prompt_embeds=embeds,
                    width=width,
                    height=height,
                    num_inference_steps=1,
                    num_images_per_prompt=count,
                    output_type="latent",
                )

    def generate(
        self,
        job: Job,
        on_step: StepCallback,
        cancelled: CancelCheck,
        on_note: NoteCallback = lambda note: None,
    ) -> JobSucceeded:
        for note in self.apply_loras(job.loras):
            on_note(note)
        references = [open_reference(path) for path in job.images]
        params = job.params
        if params.enable_prompt_expansion:
            params = replace(params, prompt=self.expand_prompt(params.prompt, params.seed, references))
        total = params.num_inference_steps

        def step_end(
            pipe: Flux2Pipeline, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            # Raising here skips the remaining steps and the VAE decode; the pipeline stays reusable.
            if cancelled():
                raise Cancelled()
            on_step(step + 1, total)
            return tensors

        started = time.perf_counter()
        with torch.inference_mode():
            kwargs = {
                **pipeline_kwargs(params, references),
                "prompt": None,
                "prompt_embeds": self.prompt_embeds(params.prompt),
            }
            with self.accelerator.preset(_preset(params.acceleration), total):
                output = self.pipe(**kwargs, callback_on_step_end=step_end)
        images = list(output.images)
        if params.enable_safety_checker:
            images, flagged = self.safety.screen(images)
        else:
            flagged = [False] * len(images)
        return JobSucceeded(
            request_id=job.request_id,
            images=tuple(encode_image(image, params.output_format) for image in images),
            seed=params.seed,
            prompt=params.prompt,
            has_nsfw_concepts=tuple(flagged),
            inference_seconds=time.perf_counter() - started,
        )
