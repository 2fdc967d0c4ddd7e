"""The entry points into the GPU side, and all the HTTP side may call of it besides the wire: the worker's
main loop (`run_worker`, run in a spawned child process that alone owns the device), and, for the one-shot
commands, `load_generator`, `run_job`, `download_model` and `lora_report`.

Nothing here imports torch at module level: the HTTP process imports this module to name the process
target, and must stay light and CUDA-free.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.queues import Queue
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.logs import configure_logging
from pipeline.messages import (
    FailureKind,
    FromWorker,
    Job,
    JobFailed,
    JobNote,
    JobStarted,
    JobSucceeded,
    Shutdown,
    StepProgress,
    ToWorker,
    WorkerConfig,
    WorkerReady,
    WorkerStartupFailed,
    WorkerStats,
)

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import SynchronizedString

    from pipeline.generation import CancelCheck, ImageGenerator, NoteCallback, StepCallback
    from pipeline.loading import LoadedPipeline
    from pipeline.models import HubModel, TinyModel
    from pipeline.safety import SafetyChecker

log = logging.getLogger(__name__)

_PARENT_CHECK_SECONDS = 1.0


def load_generator(config: WorkerConfig) -> tuple[ImageGenerator, WorkerReady]:
    """Load the model with its LoRA slots: the worker's start, and `flux2-server generate`'s."""
    import torch

    from pipeline.loading import load_pipeline
    from pipeline.safety import SafetyChecker

    registry = config.registry
    spec = registry.get(config.model_name or registry.default_name(torch.cuda.is_available()))
    log.warning(
        "MODEL: %r (%s)%s", spec.name, spec.source, "" if config.model_name else ", chosen automatically"
    )
    started = time.perf_counter()
    loaded = load_pipeline(spec, config.cache_dir, config.memory_profile)
    safety = SafetyChecker(spec.safety_checker, config.cache_dir, loaded.device)
    return prepare_generator(spec.name, loaded, safety, config, started)


def prepare_generator(
    model: str, loaded: LoadedPipeline, safety: SafetyChecker, config: WorkerConfig, started: float
) -> tuple[ImageGenerator, WorkerReady]:
    """Everything the worker sets up on a loaded pipeline: LoRA slots and tiers, caches, the compiled and
    warmed-up presets, the memory account. `scripts/gpu_check` runs it on a random-weight model."""
    import torch
    from torch._dynamo.utils import counters

    from pipeline.acceleration import Accelerator, choose_attention_backend, keep_compiled_code_in
    from pipeline.generation import ImageGenerator
    from pipeline.lora_cache import LoraMemoryCache
    from pipeline.lora_slots import LoraSlots
    from pipeline.memory import held_account, lora_device_budget
    from pipeline.prompt_cache import PromptEmbeddingCache

    pipe, device = loaded.pipe, loaded.device
    compile_blocks = device.type == "cuda" if config.compile is None else config.compile
    # Compiled: every slot stays active, so swaps never change the graph; eager: empty slots are skipped.
    slots = LoraSlots(
        pipe.transformer,
        config.lora_slots,
        config.max_lora_rank,
        skip_empty=not compile_blocks,
        dtype=loaded.dtype,
    )
    device_tier = config.lora_device_bytes
    if device_tier is None:
        device_tier = lora_device_budget(device, loaded.profile)
    accelerator = Accelerator(pipe.transformer)
    accelerator.set_attention_backend(choose_attention_backend(device, config.attention_backend))
    generator = ImageGenerator(
        pipe,
        slots,
        LoraMemoryCache(config.lora_memory_bytes),
        safety,
        PromptEmbeddingCache(config.prompt_cache_bytes),
        accelerator,
        lycoris_truncate=config.lycoris_truncate,
        lora_device_bytes=device_tier,
    )
    compile_seconds, reused = 0.0, 0
    if compile_blocks:
        compiled_code = keep_compiled_code_in(config.cache_dir)
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        # After the slots exist: slot swaps only change parameter data, so these graphs are the last.
        accelerator.compile()
        compile_started = time.perf_counter()
        generator.warm_up(config.warmup_sizes)
        compile_seconds = time.perf_counter() - compile_started
        reused = counters["inductor"]["fxgraph_cache_hit"] - hits_before
        log.info(
            "compiled and warmed up in %.1f s (%d graphs loaded from %s)",
            compile_seconds,
            reused,
            compiled_code,
        )
    components = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    held = held_account(
        {**components, "safety_checker": safety.model}, loaded.profile, config.prompt_cache_bytes
    )
    ready = WorkerReady(
        model=model,
        device=str(device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
        compiled=compile_blocks,
        compile_seconds=compile_seconds,
        compiled_graphs_reused=reused,
        attention_backend=accelerator.attention_backend,
        memory_profile=loaded.profile.name,
        memory=(
            *held.weights.items(),
            ("lora_slots", held.lora_slots),
            ("lora_device_cache", device_tier),
            ("prompt_cache", held.prompt_cache),
        ),
        pid=os.getpid(),
    )
    return generator, ready


def lora_report(path: Path, max_rank: int, lycoris_truncate: bool) -> tuple[str, bool]:
    """`flux2-server lora-info`: the worker's own reading of a LoRA file, as text, and whether it would
    take the file."""
    from pipeline.lora_info import describe_lora, format_report

    report = describe_lora(path, max_rank, lycoris_truncate)
    return format_report(report), report.refused is None


def run_job(
    generator: ImageGenerator,
    job: Job,
    on_step: StepCallback,
    cancelled: CancelCheck,
    on_note: NoteCallback = lambda note: None,
) -> JobSucceeded | JobFailed:
    """One job, every failure turned into the message that reports it."""
    import torch

    from pipeline.errors import PipelineError

    started = time.perf_counter()
    try:
        return generator.generate(job, on_step, cancelled, on_note)
    except PipelineError as exc:
        kind, message, loc = exc.kind, exc.message, exc.loc
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        kind, message, loc = FailureKind.OUT_OF_MEMORY, f"out of device memory: {exc}", ()
    except Exception as exc:
        log.error("generation failed:\n%s", traceback.format_exc(), extra={"request_id": job.request_id})
        kind, message, loc = FailureKind.INTERNAL, f"{type(exc).__name__}: {exc}", ()
    return JobFailed(job.request_id, kind, message, loc, time.perf_counter() - started)


def serve_job(
    generator: ImageGenerator,
    job: Job,
    send: Callable[[FromWorker], None],
    cancelled: CancelCheck,
    worker: str = "",
) -> None:
    """A job for the server, reported as messages: started, its notes and steps, how it ended, and the
    worker's figures after it. `worker` names the worker when there are several (a Ray Serve replica)."""
    held = all(lora.sha256 in generator.lora_cache for lora in job.loras)
    send(JobStarted(job.request_id, worker, held))

    def on_step(step: int, total: int) -> None:
        send(StepProgress(job.request_id, step, total))

    def on_note(note: str) -> None:
        send(JobNote(job.request_id, note))

    send(run_job(generator, job, on_step, cancelled, on_note))
    send(_worker_stats(generator, worker))


def _worker_stats(generator: ImageGenerator, worker: str = "") -> WorkerStats:
    import torch
    from torch._dynamo.utils import counters

    cache, cuda = generator.lora_cache, torch.cuda.is_available()
    return WorkerStats(
        lora_switch_seconds=generator.last_lora_switch_seconds,
        lora_memory_hits=cache.hits,
        lora_memory_misses=cache.misses,
        lora_memory_evictions=cache.evictions,
        compiled_graphs=int(counters["stats"]["unique_graphs"]),
        device_memory_bytes=torch.cuda.memory_allocated() if cuda else 0,
        device_peak_bytes=torch.cuda.max_memory_allocated() if cuda else 0,
        worker=worker,
    )


def _cancelled(cancelled_id: SynchronizedString, request_id: str) -> CancelCheck:
    """Whether the server asked this job to stop: keyed by id, so a late cancel never stops the next."""
    own_id = request_id.encode()
    return lambda: bool(cancelled_id.value == own_id)


def _die_with_the_server() -> None:
    """On Linux the kernel kills this process the moment the server's dies, `kill -9` included, so a
    worker never holds the GPU for a server that is gone (elsewhere the idle loop's parent check does)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _no_process_shared_locks() -> None:
    """tqdm (the pipeline's progress bars) would make a multiprocessing lock: a named semaphore that stays
    registered, and is reported as leaked at the server's exit, whenever the worker is killed."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def run_worker(
    config: WorkerConfig,
    inbox: Queue[ToWorker],
    outbox: Queue[FromWorker],
    cancelled_id: SynchronizedString,
) -> None:
    """Load the model once, then serve jobs one at a time until told to shut down.

    `cancelled_id` holds the id of a request the server wants stopped; the running job checks it after
    every denoising step. Keyed by id, so a cancel that arrives late can never hit the next job.
    """
    # A process group of its own: the server can kill it with everything it starts (torch.compile's
    # workers) if it hangs, and a terminal's Ctrl-C reaches only the server, which stops it in order.
    os.setsid()
    _die_with_the_server()
    _no_process_shared_locks()
    configure_logging(config.log_level, config.log_json)
    try:
        generator, ready = load_generator(config)
    except Exception as exc:
        log.error("model load failed:\n%s", traceback.format_exc())
        outbox.put(WorkerStartupFailed(f"{type(exc).__name__}: {exc}"))
        return
    log.info("model %r ready on %s in %.1f s", ready.model, ready.device, ready.load_seconds)
    outbox.put(ready)
    parent = multiprocessing.parent_process()
    while True:
        try:
            message = inbox.get(timeout=_PARENT_CHECK_SECONDS)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the server was killed: do not linger
                log.error("the server process is gone; the worker exits")
                outbox.cancel_join_thread()  # nobody will read what is still buffered: do not wait on it
                return
            continue
        if isinstance(message, Shutdown):
            return
        serve_job(generator, message, outbox.put, _cancelled(cancelled_id, message.request_id))


class DownloadError(Exception):
    """A model's weights cannot be fetched; the message says why and what to do."""


def download_model(spec: HubModel | TinyModel, cache_dir: Path) -> Path:
    """Fetch (or resume fetching) a model's weights into the Hugging Face cache, or build the tiny one;
    returns the folder it is loaded from."""
    from pipeline.models import TinyModel

    if isinstance(spec, TinyModel):
        from pipeline.tiny import ensure_tiny_pipeline

        return ensure_tiny_pipeline(cache_dir / "tiny", seed=spec.seed)
    if spec.local_dir is not None:
        return spec.local_dir  # read from there: nothing to download
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Files already in the cache are skipped and partial ones resumed: running it again is cheap.
        return Path(snapshot_download(spec.repo_id, revision=spec.revision))
    except LocalEntryNotFoundError as exc:
        raise DownloadError(
            f"{spec.repo_id} is not cached and the Hub is offline or unreachable: {exc}"
        ) from None
    except HfHubHTTPError as exc:
        gated = "FLUX.2 [dev] is gated: accept its licence on Hugging Face and set HF_TOKEN"
        raise DownloadError(f"downloading {spec.repo_id} failed: {exc} ({gated})") from None
