"""The wire between the HTTP side and the GPU worker.

Everything the spawned worker receives (its `WorkerConfig` at start, then `Job`s) and everything it sends
back: small typed messages, one direction each, carried over multiprocessing queues. This module imports
neither torch nor FastAPI, so both sides can depend on it; everything in it must stay picklable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pipeline.models import Registry

# --- server -> worker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker process is started with: the model to load and how to run it."""

    registry: Registry
    model_name: str | None  # None: the worker picks flux2-dev if it sees CUDA, else tiny
    cache_dir: Path
    lora_slots: int = 3
    max_lora_rank: int = 128
    lora_memory_bytes: int = 8 * 1024**3  # parsed LoRAs kept in CPU memory
    lora_device_bytes: int | None = None  # ... and on the GPU; None: what the memory profile leaves free
    prompt_cache_bytes: int = 1024**3  # text-encoder outputs kept on the device
    compile: bool | None = None  # compile the transformer's blocks for `regular`/`high`; None: on CUDA only
    warmup_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) compiled for at startup
    attention_backend: str | None = None  # a diffusers backend name; None: the fastest exact one available
    memory_profile: str | None = None  # a profile of the model's entry in models.yaml; None: by device memory
    lycoris_truncate: bool = False  # LoKr/LoHa over the slot rank: approximated by SVD instead of refused
    log_level: str = "info"
    log_json: bool = False


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA of the request, fetched by the HTTP side: a local safetensors file it checked, the file's
    content hash (the worker's cache key), and the request's scale. `source` is the path the request gave,
    for messages."""

    file: str
    sha256: str
    scale: float
    source: str


@dataclass(frozen=True)
class GenerationParams:
    """A validated request, already reduced to what the pipeline needs (sizes resolved, seed drawn)."""

    prompt: str
    width: int | None  # None (edits without `image_size`): the first reference image's size, as
    height: int | None  # Flux2Pipeline takes it (scaled to at most 1 MP, floored to multiples of 16)
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    output_format: str = "png"
    acceleration: str = "regular"
    enable_safety_checker: bool = True
    enable_prompt_expansion: bool = False


@dataclass(frozen=True)
class Job:
    """One request for the worker: it can only be made with LoRAs and reference images already fetched.
    `images` are the reference images as files the HTTP side decoded, made RGB and scaled to at most one
    megapixel (lossless PPMs), in the request's order."""

    request_id: str
    params: GenerationParams
    loras: tuple[ResolvedLora, ...] = ()
    images: tuple[str, ...] = ()

    @property
    def lora_set(self) -> str:
        """The LoRA set as one id: the same files at the same scales give the same id whatever their order
        or where they came from; no LoRA at all is its own id. Scale-out routes by it (a replica that holds
        a set's LoRAs switches to them without reading a file)."""
        if not self.loras:
            return "no-loras"
        pairs = sorted(f"{lora.sha256}:{lora.scale!r}" for lora in self.loras)
        return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Shutdown:
    """Asks the worker to leave its loop and exit."""


# --- worker -> server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    model: str
    device: str
    dtype: str
    load_seconds: float  # loading, compiling and warming up
    compiled: bool = False  # `regular` and `high` run compiled blocks
    compile_seconds: float = 0.0  # compiling and warming up, part of load_seconds
    compiled_graphs_reused: int = 0  # graphs loaded from the compile cache (a warm restart) instead of built
    attention_backend: str = "native"
    memory_profile: str = "full"
    # Bytes held, accounted (pipeline/memory.py): each component's weights as held, the LoRA slots, and the
    # prompt cache's budget.
    memory: tuple[tuple[str, int], ...] = ()
    pid: int = 0  # the worker's process id (to inspect a worker that hangs)


@dataclass(frozen=True)
class WorkerStartupFailed:
    message: str


@dataclass(frozen=True)
class JobStarted:
    request_id: str
    worker: str = ""  # which worker runs it, when there are several (a Ray Serve replica)
    loras_in_memory: bool = True  # every LoRA of the job was already parsed in that worker's memory


@dataclass(frozen=True)
class JobNote:
    """Something the user should read in the request's logs (a LoRA key dropped, a LoKr truncated)."""

    request_id: str
    message: str


@dataclass(frozen=True)
class StepProgress:
    request_id: str
    step: int  # 1-based count of finished denoising steps
    total: int


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # by `output_format`


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str  # one of CONTENT_TYPES
    width: int
    height: int


@dataclass(frozen=True)
class JobSucceeded:
    request_id: str
    images: tuple[EncodedImage, ...]
    seed: int
    prompt: str
    has_nsfw_concepts: tuple[bool, ...]
    inference_seconds: float


@dataclass(frozen=True)
class WorkerStats:
    """Sent after every job, for metrics: counters are cumulative since the worker started."""

    lora_switch_seconds: float  # applying this job's LoRA set to the slots
    lora_memory_hits: int
    lora_memory_misses: int
    lora_memory_evictions: int
    compiled_graphs: int  # torch.compile graphs built so far; growth after warm-up means recompiles
    device_memory_bytes: int  # allocated on the accelerator now (0 on CPU)
    device_peak_bytes: int
    worker: str = ""  # which worker, when there are several (each counts for itself)


class FailureKind(StrEnum):
    """Why a job failed; the HTTP side maps each kind to a fal-shaped answer in one place."""

    INVALID_INPUT = "invalid_input"  # the request can never succeed as sent (a LoRA that does not fit ...)
    OUT_OF_MEMORY = "out_of_memory"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    WORKER_LOST = "worker_lost"  # the worker running it died (a remote replica), and a second try did too


@dataclass(frozen=True)
class JobFailed:
    request_id: str
    kind: FailureKind
    message: str
    loc: tuple[str | int, ...] = ()  # the input to blame, under "body", for 422 answers
    inference_seconds: float = 0.0


ToWorker = Job | Shutdown
FromWorker = (
    WorkerReady
    | WorkerStartupFailed
    | JobStarted
    | JobNote
    | StepProgress
    | JobSucceeded
    | JobFailed
    | WorkerStats
)
