"""The GPU check: FLUX.2 [dev] at full size with random weights, under each memory profile in turn, through
the worker's own code; one short command for a lent GPU (`scripts/gpu_check` installs what it needs first).

For each profile of `flux2-dev` in models.yaml, on a process whose device memory is capped to the card the
profile is for (`full`: the whole GPU, `fp8`: 80 GiB, `low-memory`: 32 GiB):
1. builds every component from FLUX.2 [dev]'s real configs (tests/fixtures/flux2-dev) with random weights
   on the GPU (random weights time the same as real ones; nothing is downloaded), quantized as the profile
   says with the loader's own configs (`loading.quantize_built`), offloaded if it says so; a random ViT-base
   safety checker as FLUX.2's; a byte-level vocabulary in the processor (the real one is not in the
   fixtures; token ids are all the text encoder sees);
2. hands it to the worker's own set-up (`worker.prepare_generator`: LoRA slots at rank 128, the device
   tier, caches, compiled blocks warmed up at 1024x1024 and 1024x768), timing the compile;
3. runs one request per preset (`none`, `regular`, `high`) without LoRAs and with three random rank-64
   LoRAs on every Linear, and one edit (a 1024x1024 reference), each a full `ImageGenerator.generate`:
   text encoder, denoising, VAE, safety checker and PNG encoding;
4. records seconds per denoising step, seconds per image end to end, LoRA switch time (from host memory,
   and again from the device tier), peak device memory and compiled graphs; fails loudly (exit 1) on an
   out-of-memory error or on any graph compiled after the warm-up.
Then the first profile that passed starts again in a new process with the compile cache the first start
filled, as a restarted worker does: its compile time, the graphs it reused and its start-to-first-image
time (random weights are built, not loaded: the weights' load time is not in it).
Each profile appends a row per request to BENCHMARKS.md, dated, naming the GPU, and the run ends with a
JSON summary (`--json`).

Reduced mode (no CUDA, or `--reduced`): the same code on the tiny model's configs on the CPU, eager
(`--compile`: compiled, and restarted), at 256x256 with 4 steps, under `full` and `fp8`: it proves the
script, and the test suite runs it. Its
numbers say nothing about a GPU, and it writes no BENCHMARKS.md row unless `--benchmarks` names a file.

    PYTHONPATH=. python3 scripts/gpu_check.py [--reduced] [--profiles full,fp8,low-memory] [--steps 28]
        [--benchmarks BENCHMARKS.md] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pipeline  # noqa: F401  # first: importing it silences the noise diffusers makes at import

# isort: split
import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch._dynamo.utils import counters
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from pipeline.generation import ImageGenerator
from pipeline.loading import LoadedPipeline, build_components, quantize_built, quiet_progress_bars
from pipeline.memory import lora_device_budget
from pipeline.messages import GenerationParams, Job, ResolvedLora, WorkerConfig
from pipeline.models import (
    PACKAGED_REGISTRY,
    HubSafetyChecker,
    MemoryProfile,
    TinySafetyChecker,
    load_registry,
)
from pipeline.safety import NSFW_LABEL, SafetyChecker
from pipeline.testing import linear_shapes, write_lora
from pipeline.tiny import ensure_tiny_pipeline, processor
from pipeline.worker import prepare_generator

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "fixtures" / "flux2-dev"
GiB = 1024**3
CARDS_GIB = {"full": None, "fp8": 80, "low-memory": 32}  # the card each profile is for; None: this one
PRESETS = ("none", "regular", "high")
LORA_RANK = 64
SLOT_RANK = 128


@dataclass(frozen=True)
class Mode:
    name: str
    folder: Path
    device: torch.device
    dtype: torch.dtype
    size: int
    steps: int
    compile: bool
    profiles: tuple[str, ...]


@dataclass
class Row:
    profile: str
    request: str
    loras: int
    seconds_per_step: float
    seconds_per_image: float
    lora_switch_seconds: float | None
    peak_gib: float


@dataclass
class ProfileResult:
    profile: str
    cap_gib: float | None
    build_seconds: float
    compile_seconds: float
    graphs: int
    held_gib: float
    rows: list[Row]
    tier_switch_seconds: float | None = None
    error: str | None = None
    graphs_reused: int = 0
    first_image_seconds: float | None = None  # a restart's: from its start to its first image


def full_mode(steps: int, profiles: tuple[str, ...]) -> Mode:
    return Mode("full", REAL, torch.device("cuda"), torch.bfloat16, 1024, steps, True, profiles)


def reduced_mode(cache_dir: Path, profiles: tuple[str, ...], compile_blocks: bool) -> Mode:
    folder = ensure_tiny_pipeline(cache_dir / "tiny")
    return Mode("reduced", folder, torch.device("cpu"), torch.bfloat16, 256, 4, compile_blocks, profiles)


def safety_checker(folder: Path, device: torch.device, real_size: bool) -> SafetyChecker:
    """FLUX.2's checker with random weights: at its real size (ViT-base/16 with Falconsai's labels), or the
    tiny model's."""
    if not real_size:
        return SafetyChecker(TinySafetyChecker(source="tiny"), folder, device)
    if not (folder / "config.json").exists():
        config = ViTConfig(num_labels=2, id2label={0: "normal", 1: NSFW_LABEL})
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor().save_pretrained(folder)  # type: ignore[no-untyped-call]
    spec = HubSafetyChecker(source="hub", repo_id="random/vit-base", local_dir=folder)
    return SafetyChecker(spec, folder, device)


def build(mode: Mode, profile: MemoryProfile) -> LoadedPipeline:
    """The whole pipeline from the mode's configs with random weights, held as `profile` holds it."""
    with torch.device(mode.device):
        components = build_components(mode.folder, mode.dtype)
    quantize_built(components, profile, mode.device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(mode.folder / "scheduler")
    pipe = Flux2Pipeline(scheduler=scheduler, tokenizer=processor(), **components)  # type: ignore[arg-type]
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    if profile.offload == "model" and mode.device.type == "cuda":
        pipe.enable_model_cpu_offload(device=mode.device)
    return LoadedPipeline(pipe, mode.device, mode.dtype, profile)


def write_loras(generator: ImageGenerator, folder: Path) -> tuple[ResolvedLora, ...]:
    shapes = linear_shapes(generator.pipe.transformer)
    paths = [
        write_lora(folder / f"lora{seed}.safetensors", shapes, list(shapes), LORA_RANK, seed=seed)
        for seed in range(3)
    ]
    return tuple(ResolvedLora(str(p), f"random-{i}", 0.8, p.name) for i, p in enumerate(paths))


def reference(folder: Path, size: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path = folder / "reference.ppm"
    Image.fromarray(pixels).save(path)
    return str(path)


def run(generator: ImageGenerator, job: Job) -> tuple[float, float]:
    """Seconds per denoising step (median interval between step reports) and seconds for the request."""
    marks: list[float] = []
    started = time.perf_counter()
    generator.generate(job, lambda step, total: marks.append(time.perf_counter()), lambda: False)
    elapsed = time.perf_counter() - started
    intervals = [b - a for a, b in itertools.pairwise(marks)]
    return (statistics.median(intervals) if intervals else elapsed), elapsed


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0


def start(mode: Mode, profile: MemoryProfile, scratch: Path) -> tuple[ImageGenerator, ProfileResult]:
    """What a worker's start does, under the profile's memory cap: the model (built, not loaded), the
    checker, then the worker's own set-up with its compile and warm-up."""
    device = mode.device
    cap = CARDS_GIB.get(profile.name) if mode.name == "full" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total) if cap else 1.0, device)
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()
    counters.clear()
    started = time.perf_counter()
    loaded = build(mode, profile)
    checker = safety_checker(scratch.parent / "checker", device, real_size=mode.name == "full")
    build_seconds = time.perf_counter() - started
    # The device tier sized for the card the profile is for, by the worker's own rule.
    tier = None if cap is None else lora_device_budget(device, profile, cap * GiB)
    config = WorkerConfig(
        load_registry(PACKAGED_REGISTRY),
        "flux2-dev",
        scratch,
        max_lora_rank=SLOT_RANK,
        lora_device_bytes=tier,
        compile=mode.compile,
        # Two sizes, as the server's six: the second makes the sequence length dynamic, so other sizes and
        # edits (reference latents lengthen the sequence) reuse the graphs. The other four add no graph.
        warmup_sizes=((mode.size, mode.size), (mode.size, mode.size * 3 // 4)),
    )
    generator, ready = prepare_generator(f"random {mode.name}", loaded, checker, config, started)
    result = ProfileResult(
        profile.name,
        cap,
        build_seconds,
        ready.compile_seconds,
        int(counters["stats"]["unique_graphs"]),
        sum(size for _, size in ready.memory) / GiB,
        [],
        graphs_reused=ready.compiled_graphs_reused,
    )
    return generator, result


def base_params(mode: Mode) -> GenerationParams:
    return GenerationParams("a lighthouse at dusk", mode.size, mode.size, mode.steps, 4.0, seed=1)


def check_profile(mode: Mode, profile: MemoryProfile, scratch: Path) -> ProfileResult:
    device = mode.device
    generator, result = start(mode, profile, scratch)
    graphs = result.graphs
    loras = write_loras(generator, scratch)
    base = base_params(mode)
    edit_job = Job("edit", replace(base, width=None, height=None), images=(reference(scratch, mode.size),))
    jobs = [(f"{preset}", Job(preset, replace(base, acceleration=preset))) for preset in PRESETS]
    jobs += [(f"{preset}", Job(preset, replace(base, acceleration=preset), loras)) for preset in PRESETS]
    jobs.append(("edit regular", edit_job))
    for label, job in jobs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, image = run(generator, job)
        switch = generator.last_lora_switch_seconds if job.loras else None
        result.rows.append(Row(profile.name, label, len(job.loras), step, image, switch, peak_gib(device)))
        print(
            f"  {profile.name:10} {label:13} loras {len(job.loras)}  {step:7.3f} s/step  {image:7.2f} s/image"
        )
    # A switch among LoRAs the device tier holds: away to none, then back to all three.
    generator.apply_loras(())
    generator.apply_loras(loras)
    result.tier_switch_seconds = generator.last_lora_switch_seconds
    new_graphs = int(counters["stats"]["unique_graphs"]) - graphs
    if mode.compile and new_graphs:
        raise RuntimeError(f"profile {profile.name!r}: {new_graphs} graphs compiled after the warm-up")
    return result


def restart(mode: Mode, profile: MemoryProfile, scratch: Path) -> None:
    """A second start of `profile` in this fresh process with the compile cache the first one filled:
    prints its result (compile time, graphs reused, start to first image) as one JSON line."""
    began = time.perf_counter()
    generator, result = start(mode, profile, scratch)
    run(generator, Job("restart", base_params(mode)))
    result.first_image_seconds = time.perf_counter() - began
    print(json.dumps(asdict(result)))


def measure_restart(profile: str, scratch: Path) -> ProfileResult:
    """Runs `restart` in a new process, as a restarted worker is (the compile cache folder is inherited)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--restart", profile, "--scratch", str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the restart failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    return ProfileResult(**{**fields, "profile": f"{profile}, restarted", "rows": []})


def benchmark_rows(results: list[ProfileResult], gpu: str, mode: Mode) -> str:
    date = datetime.date.today().isoformat()
    lines = []
    for result in results:
        cap = (
            f"{result.cap_gib} GiB" if result.cap_gib else ("whole GPU" if mode.name == "full" else "no cap")
        )
        image = f"{mode.size}² {mode.steps} steps"
        for row in result.rows:
            seconds = row.lora_switch_seconds
            switch = f"{seconds * 1000:.0f}" if seconds is not None else ""
            lines.append(
                f"| {date} | {gpu} | {result.profile} ({cap}) | {image} | {row.request}"
                f" | {row.loras} | {row.seconds_per_step:.3f} | {row.seconds_per_image:.2f} | {switch}"
                f" | {row.peak_gib:.1f} | {result.compile_seconds:.0f} |"
            )
        if result.first_image_seconds is not None:
            lines.append(
                f"| {date} | {gpu} | {result.profile} ({cap}) | {image} | start to first image, warm compile"
                f" cache ({result.graphs_reused} of {result.graphs} graphs reused) | 0 | |"
                f" {result.first_image_seconds:.1f} | | | {result.compile_seconds:.0f} |"
            )
        tier = result.tier_switch_seconds
        if tier is not None:
            lines.append(
                f"| {date} | {gpu} | {result.profile} ({cap}) | | LoRA switch back (device tier) | 3 | | |"
                f" {tier * 1000:.1f} | | |"
            )
    return "\n".join(lines) + "\n"


HEADER = (
    "| date | GPU | profile (memory cap) | image | request | LoRAs | s/step | s/image | LoRA switch ms"
    " | peak GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reduced", action="store_true", help="the tiny model's configs on the CPU")
    parser.add_argument("--profiles", help="default: full,fp8,low-memory (reduced: full,fp8; NF4 needs CUDA)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--benchmarks", type=Path, help="append rows here (full mode: BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cache-dir", type=Path, help="reduced: where the tiny model is (built if missing)")
    parser.add_argument("--compile", action="store_true", help="reduced: compile too (minutes on a CPU)")
    parser.add_argument("--restart", metavar="PROFILE", help=argparse.SUPPRESS)  # measure_restart's child
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch_root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    quiet_progress_bars()
    if args.reduced or not torch.cuda.is_available():
        cache_dir = args.cache_dir or scratch_root / "cache"
        mode = reduced_mode(cache_dir, tuple((args.profiles or "full,fp8").split(",")), args.compile)
        benchmarks = args.benchmarks
        gpu = f"CPU ({torch.get_num_threads()} threads)"
    else:
        mode = full_mode(args.steps, tuple((args.profiles or "full,fp8,low-memory").split(",")))
        benchmarks = args.benchmarks or ROOT / "BENCHMARKS.md"
        gpu = torch.cuda.get_device_name()
    if args.restart:
        restart(
            mode,
            load_registry(PACKAGED_REGISTRY).get("flux2-dev").memory_profiles[args.restart],
            args.scratch,
        )
        return 0
    profiles = ", ".join(mode.profiles)
    print(f"gpu_check, {mode.name} mode on {gpu}: torch {torch.__version__}, profiles {profiles}")
    spec = load_registry(PACKAGED_REGISTRY).get("flux2-dev")
    results: list[ProfileResult] = []
    failed = False
    for name in mode.profiles:
        profile = spec.memory_profiles[name]
        scratch = scratch_root / name
        scratch.mkdir(parents=True)
        try:
            results.append(check_profile(mode, profile, scratch))
        except Exception as exc:  # an out-of-memory error, a recompile, a missing package: say which, go on
            failed = True
            kind = "OUT OF MEMORY" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            print(f"FAILED {name}: {kind}: {exc}\n{traceback.format_exc()}", file=sys.stderr)
            results.append(ProfileResult(name, CARDS_GIB.get(name), 0, 0, 0, 0, [], error=f"{kind}: {exc}"))
        finally:
            torch._dynamo.reset()
            if mode.device.type == "cuda":
                torch.cuda.empty_cache()
    passed = [r for r in results if r.error is None]
    if passed and mode.compile:  # a restart reuses compiled code only where there is some
        try:
            results.append(measure_restart(passed[0].profile, scratch_root / passed[0].profile))
        except RuntimeError as exc:
            failed = True
            results.append(
                ProfileResult(f"{passed[0].profile}, restarted", None, 0, 0, 0, 0, [], error=str(exc))
            )
    rows = benchmark_rows([r for r in results if r.error is None], gpu, mode)
    print("\n" + HEADER + rows)
    if benchmarks is not None and rows.strip():
        existing = benchmarks.read_text() if benchmarks.exists() else "# Benchmarks\n\n"
        benchmarks.write_text(existing + ("" if HEADER in existing else "\n" + HEADER) + rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    for result in results:
        if result.error:
            print(f"FAILED {result.profile}: {result.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
