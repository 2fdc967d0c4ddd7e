"""fal's input and output schema for `fal-ai/flux-2/lora`, `fal-ai/flux-2` and their `/edit` apps: defaults,
bounds, types."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.messages import GenerationParams
from server.fetch.lora_fetcher import LoraRequest

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]

PRESET_SIZES: dict[str, tuple[int, int]] = {  # name -> (width, height), as fal's toolkit defines them
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

SIZE_MULTIPLE = 16  # FLUX.2 latents are 8x downsampled, then patchified 2x2
MAX_SEED = 2**64 - 1
MAX_PROMPT_CHARS = 20_000  # FLUX.2 reads 512 tokens; far longer prompts are abuse, not art
MAX_REFERENCE_IMAGES = (
    10  # what FLUX.2 [dev] takes; the server's own limit (FLUX2_MAX_REFERENCE_IMAGES) is lower
)


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`); they are not text and would break the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate, which is not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class ImageSize(BaseModel):
    width: int = Field(default=512, ge=512, le=2048, description="Rounded to the nearest multiple of 16.")
    height: int = Field(default=512, ge=512, le=2048, description="Rounded to the nearest multiple of 16.")


class LoraWeight(BaseModel):
    path: Text = Field(min_length=1, description="URL, Hugging Face repo id, or a path under a LoRA folder.")
    scale: float = Field(default=1.0, ge=0.0, le=4.0)


class Flux2Input(BaseModel):
    """The body of `POST fal-ai/flux-2`; unknown fields are ignored, as fal does."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    guidance_scale: float = Field(default=2.5, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random (and reported) if absent.")
    num_inference_steps: int = Field(default=28, ge=4, le=50)
    image_size: ImageSizePreset | ImageSize = "landscape_4_3"
    num_images: int = Field(default=1, ge=1, le=4)
    acceleration: Literal["none", "regular", "high"] = "regular"
    enable_prompt_expansion: bool = False
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png", "webp"] = "png"

    def dimensions(self) -> tuple[int, int] | tuple[None, None]:
        """(width, height) in pixels; custom sides round to the nearest multiple of 16, halves up. None for
        an edit without `image_size`: the pipeline takes the first reference image's size."""
        if self.image_size is None:
            return None, None
        if isinstance(self.image_size, str):
            return PRESET_SIZES[self.image_size]
        return _round_side(self.image_size.width), _round_side(self.image_size.height)

    def to_params(self) -> GenerationParams:
        width, height = self.dimensions()
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed if self.seed is not None else secrets.randbits(63),
            num_images=self.num_images,
            output_format=self.output_format,
            acceleration=self.acceleration,
            enable_safety_checker=self.enable_safety_checker,
            enable_prompt_expansion=self.enable_prompt_expansion,
        )

    def lora_requests(self) -> tuple[LoraRequest, ...]:
        return ()

    def reference_urls(self) -> tuple[str, ...]:
        return ()


class Flux2LoraInput(Flux2Input):
    """The body of `POST fal-ai/flux-2/lora`."""

    loras: list[LoraWeight] = Field(default_factory=list, max_length=3)

    def lora_requests(self) -> tuple[LoraRequest, ...]:
        return tuple(LoraRequest(lora.path, lora.scale) for lora in self.loras)


class Flux2EditInput(Flux2Input):
    """The body of `POST fal-ai/flux-2/edit`: the prompt edits (or composes from) the reference images."""

    image_urls: list[Text] = Field(
        min_length=1,
        max_length=MAX_REFERENCE_IMAGES,
        description="Reference images: https/http URLs, data: URIs, or this server's own file URLs.",
    )
    image_size: ImageSizePreset | ImageSize | None = Field(  # type: ignore[assignment]  # optional on edits
        default=None, description="Absent: the first reference's size, scaled to at most 1 MP, floored to 16."
    )

    def reference_urls(self) -> tuple[str, ...]:
        return tuple(self.image_urls)


class Flux2LoraEditInput(Flux2EditInput, Flux2LoraInput):
    """The body of `POST fal-ai/flux-2/lora/edit`."""


def _round_side(pixels: int) -> int:
    return (pixels + SIZE_MULTIPLE // 2) // SIZE_MULTIPLE * SIZE_MULTIPLE


class File(BaseModel):
    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


class Timings(BaseModel):
    inference: float


class Flux2Output(BaseModel):
    images: list[File]
    timings: Timings
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str


# The apps this server answers for, by fal app id; each id's input model.
APPS: dict[str, type[Flux2Input]] = {
    "fal-ai/flux-2/lora": Flux2LoraInput,
    "fal-ai/flux-2": Flux2Input,
    "fal-ai/flux-2/lora/edit": Flux2LoraEditInput,
    "fal-ai/flux-2/edit": Flux2EditInput,
}


# --- what the other routes answer (for the OpenAPI document; the bodies are built in the routes) ---------


class ErrorBody(BaseModel):
    """fal's request error: `detail` text, and a category in `error_type` (also `X-Fal-Error-Type`)."""

    detail: str
    error_type: str | None = None


class ValidationErrorItem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    """fal's model error (FastAPI's own shape): one entry per problem, `loc` naming the input."""

    detail: list[ValidationErrorItem]


class LogEntryBody(BaseModel):
    message: str
    level: str
    source: str
    timestamp: str


class QueueStatusBody(BaseModel):
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None
    logs: list[LogEntryBody] | None
    metrics: dict[str, float] | None = None
    error: str | None = None
    error_type: str | None = None


class CancelBody(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class ReadyBody(BaseModel):
    ready: bool
    state: str
    model: str | None
    device: str | None
    dtype: str | None
    compiled: bool | None  # `regular` and `high` run compiled transformer blocks
    compile_seconds: float | None  # compiling and warming up at start
    compiled_graphs_reused: int | None  # graphs the compile cache held (a warm restart), not built again
    attention_backend: str | None
    memory_profile: str | None  # how the weights are held (models.yaml `memory_profiles`)
    memory_bytes: dict[str, int] | None  # accounted: weights per component as held, LoRA slots, prompt cache
    worker_pid: int | None  # the ready worker's process id
    queue_depth: int
    worker_restarts: int
    error: str | None
