"""FLUX.2-dev on one GPU: seconds per step for each `acceleration` preset, LoRA switch latency, compile time
and peak memory, all measured in one run on the transformer set up as the server sets it up.

Full mode (the default where CUDA is available): diffusers' `Flux2Transformer2DModel()` with its default
arguments, which are FLUX.2-dev's config (32.2 B parameters, 8 double + 48 single blocks, 48 heads x 128),
built with random weights directly in bf16 on the GPU, so nothing is downloaded; random weights time the
same as real ones. Then as the compiled server: `LoraSlots` (3 slots at `--max-rank`, every slot always
active), `Accelerator` with `choose_attention_backend`, `Accelerator.compile()`. The inputs are what
Flux2Pipeline feeds the transformer for one 1024x1024 image: 4096 image tokens, 512 text tokens, their
position ids, guidance 4. Only the transformer is timed: no text encoder, VAE or safety checker.

Measured, in this order:
1. load: building the transformer and its slots; peak device memory after it.
2. compile: `Accelerator.compile()`, then one `regular` step at the benchmark shape; compile time is that
   first step minus a warm one. Inductor caches compiled code on disk, so a second run of this script
   compiles faster: set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold number.
3. LoRA switch: `LoraSlots.apply` with three random rank-64 LoRAs on every block Linear, held in CPU memory
   (pinned on CUDA) as the worker's memory cache holds them: empty -> set A (three LoRAs), A -> set B (the
   same three in other slots at other scales), B -> empty. Median of `--switches` cycles after one untimed.
4. each preset `none`, `regular`, `high`, with set A loaded: a "generation" of `--steps` transformer calls
   inside one `Accelerator.preset(name, steps)`, each output fed back as an Euler step. One untimed run,
   then the median of `--repeats` timed ones; seconds per step = run / steps (for `high` the effective
   figure with its step cache). "blocks run" counts the calls that really computed the first double block;
   the step cache predicts the others. Peak device memory per preset.
Also reported: how many graphs torch.compile built, and whether any preset or LoRA switch made it build more.

Reduced mode (no CUDA, or `--reduced`): the same code on a small transformer of the same class in float32
on the CPU (256x256 image, 32 text tokens). It proves the script works; its numbers say nothing about a GPU.

    .venv/bin/python scripts/bench_gpu.py [--reduced] [--steps 28] [--size 1024] [--max-rank 128]
        [--repeats 3] [--switches 5] [--json PATH]

Where the project is not installed (a lent GPU machine with the repository copied over), run it from the
repository's root as `PYTHONPATH=. python3 scripts/bench_gpu.py`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  # first: importing it silences the noise diffusers makes at import

# isort: split
import diffusers
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from torch._dynamo.utils import counters

from pipeline.acceleration import PRESETS, Accelerator, Preset, choose_attention_backend
from pipeline.lora_slots import LoraSlots, ParsedLora
from pipeline.testing import linear_shapes

GiB = 1024**3
NUM_SLOTS = 3  # the server's default
LORA_RANK = 64
GUIDANCE = 4.0
PATCH = 16  # pixels per image token: the VAE's 8x, then the pipeline's 2x2 patchify
BLOCK_LISTS = ("transformer_blocks.", "single_transformer_blocks.")
TABLE_HEADER = ("measurement", "result", "vs none", "blocks run", "peak memory")


@dataclass(frozen=True)
class Mode:
    name: str
    device: torch.device
    dtype: torch.dtype
    config: dict[str, Any]  # Flux2Transformer2DModel arguments; empty: FLUX.2-dev's
    size: int
    text_tokens: int
    repeats: int
    switches: int


FULL = Mode("full", torch.device("cuda"), torch.bfloat16, {}, 1024, 512, repeats=3, switches=5)
# Small enough for two CPU cores, compile included, in well under a minute.
REDUCED = Mode(
    "reduced",
    torch.device("cpu"),
    torch.float32,
    {
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 2,  # two blocks of one class: they must share their compiled graph
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "axes_dims_rope": (8, 8, 8, 8),  # sums to attention_head_dim
    },
    256,
    32,
    repeats=2,
    switches=5,
)


@dataclass(frozen=True)
class Inputs:
    """One image's transformer inputs, shaped and typed as Flux2Pipeline passes them."""

    latents: torch.Tensor  # (1, image tokens, in_channels)
    prompt_embeds: torch.Tensor  # (1, text tokens, joint_attention_dim)
    img_ids: torch.Tensor  # (1, image tokens, 4) int64: (t, h, w, l) = (0, row, column, 0)
    txt_ids: torch.Tensor  # (1, text tokens, 4) int64: (0, 0, 0, position)
    guidance: torch.Tensor  # (1,) float32


@dataclass
class PresetRuns:
    seconds: list[float] = field(default_factory=list)
    blocks_run: list[int] = field(default_factory=list)
    finite: bool = True
    peak_bytes: int | None = None


class BlockCounter:
    """Counts real computations of the first double block. It wraps the block's compiled forward from the
    outside, so no graph changes; the step cache's hooks (added per run) wrap it in turn and do not call it
    on the steps they predict."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.count = 0
        inner = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return inner(*args, **kwargs)

        block.forward = forward


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def build(mode: Mode, max_rank: int) -> tuple[Flux2Transformer2DModel, LoraSlots, int]:
    """The transformer with its LoRA slots, and its own parameter count."""
    # Every parameter is made in its final dtype on its final device: FLUX.2-dev in float32 would be
    # 129 GB. peft's slot weights too, rather than each made in float32 on the CPU and then moved.
    with default_dtype(mode.dtype), mode.device:
        transformer = Flux2Transformer2DModel(**mode.config)
        params = sum(p.numel() for p in transformer.parameters())
        # As the compiled server: every slot always active, so a LoRA switch never changes a graph.
        slots = LoraSlots(transformer, NUM_SLOTS, max_rank, skip_empty=False)
    transformer.eval().requires_grad_(False)
    return transformer, slots, params


def random_loras(transformer: torch.nn.Module, mode: Mode) -> list[ParsedLora]:
    """Three rank-64 LoRAs on every Linear inside the blocks, in CPU memory (pinned on CUDA)."""
    shapes = {name: io for name, io in linear_shapes(transformer).items() if name.startswith(BLOCK_LISTS)}
    generator = torch.Generator(mode.device).manual_seed(0)
    loras = []
    for index in range(3):
        state_dict = {}
        for name, (in_features, out_features) in shapes.items():
            for kind, shape, std in (
                ("A", (LORA_RANK, in_features), in_features**-0.5),
                ("B", (out_features, LORA_RANK), 0.01),  # small: the fed-back latents stay finite
            ):
                # Drawn where it is fast (1.2 B numbers at full size), then kept on the CPU.
                tensor = torch.randn(shape, generator=generator, device=mode.device, dtype=mode.dtype) * std
                if mode.device.type == "cuda":
                    tensor = torch.empty(shape, dtype=mode.dtype, pin_memory=True).copy_(tensor)
                state_dict[f"transformer.{name}.lora_{kind}.weight"] = tensor
        # finite=True as read_lora_file sets it: the file was checked once, when it was read.
        loras.append(ParsedLora(f"random{index}", state_dict, finite=True))
    return loras


def make_inputs(transformer: Flux2Transformer2DModel, mode: Mode, size: int) -> Inputs:
    """Random latents and prompt embeddings, and the position ids of Flux2Pipeline's `_prepare_latent_ids`
    and `_prepare_text_ids`, for one `size` x `size` image."""
    side = size // PATCH
    config: Any = transformer.config  # diffusers' FrozenDict of the constructor's arguments
    generator = torch.Generator(mode.device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=mode.device, dtype=mode.dtype)

    one = torch.arange(1)
    return Inputs(
        latents=randn(1, side * side, config.in_channels),
        prompt_embeds=randn(1, mode.text_tokens, config.joint_attention_dim),
        img_ids=torch.cartesian_prod(one, torch.arange(side), torch.arange(side), one)[None].to(mode.device),
        txt_ids=torch.cartesian_prod(one, one, one, torch.arange(mode.text_tokens))[None].to(mode.device),
        guidance=torch.full((1,), GUIDANCE, device=mode.device, dtype=torch.float32),
    )


def generate(
    transformer: Flux2Transformer2DModel,
    accelerator: Accelerator,
    preset: Preset,
    steps: int,
    inputs: Inputs,
    counter: BlockCounter,
) -> tuple[float, int, bool]:
    """One denoising loop under `preset`: (seconds, calls that computed the blocks, latents finite)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    # The pipeline passes timestep / 1000, i.e. sigma, in the latents' dtype, from tensors on the device.
    timesteps = sigmas[:-1].to(device=inputs.latents.device, dtype=inputs.latents.dtype)
    step_sizes = (sigmas[1:] - sigmas[:-1]).tolist()
    latents = inputs.latents
    counter.count = 0
    synchronize(latents.device)
    started = time.perf_counter()
    with torch.inference_mode(), accelerator.preset(preset, steps):
        for step in range(steps):
            velocity = transformer(
                hidden_states=latents,
                encoder_hidden_states=inputs.prompt_embeds,
                timestep=timesteps[step : step + 1],
                img_ids=inputs.img_ids,
                txt_ids=inputs.txt_ids,
                guidance=inputs.guidance,
                return_dict=False,
            )[0]
            latents = latents + step_sizes[step] * velocity  # flow matching's Euler step
    synchronize(latents.device)
    elapsed = time.perf_counter() - started
    return elapsed, counter.count, bool(torch.isfinite(latents).all())


def time_switches(
    slots: LoraSlots, loras: list[ParsedLora], cycles: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per `slots.apply`, by transition; leaves set A loaded."""
    first, second, third = loras
    sets: dict[str, list[tuple[ParsedLora, float]]] = {
        "empty -> A": [(first, 1.0), (second, 0.8), (third, 0.6)],
        "A -> B": [(third, 0.9), (first, -0.5), (second, 1.2)],
        "B -> empty": [],
    }
    times: dict[str, list[float]] = {name: [] for name in sets}
    for cycle in range(cycles + 1):  # the first is untimed: first touch of every page
        for name, loras_set in sets.items():
            synchronize(device)
            started = time.perf_counter()
            slots.apply(loras_set)
            synchronize(device)
            if cycle:
                times[name].append(time.perf_counter() - started)
    slots.apply(sets["empty -> A"])
    return times


def amount(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 10**8 else f"{count / 1e6:.2f} M"


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GiB:.1f} GiB"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        first, *numbers = zip(cells, widths, strict=True)  # a name, then right-aligned figures
        padded = [first[0].ljust(first[1]), *(cell.rjust(width) for cell, width in numbers)]
        return "| " + " | ".join(padded) + " |"

    print(line(TABLE_HEADER))
    rule = ["-" * (width + 1) + ":" for width in widths]  # right-aligned numbers
    rule[0] = ":" + rule[0][:-1]
    print("|" + "|".join(rule) + "|")
    for row in rows:
        print(line(row))


def measure(mode: Mode, size: int, steps: int, repeats: int, switches: int, max_rank: int) -> dict[str, Any]:
    """Every measurement of the benchmark, in the order the module docstring gives, as JSON-ready data."""
    device = mode.device
    reset_peak(device)
    started = time.perf_counter()
    transformer, slots, params = build(mode, max_rank)
    synchronize(device)
    load_seconds = time.perf_counter() - started
    load_peak = peak(device)
    slot_params = sum(p.numel() for p in transformer.parameters()) - params
    accelerator = Accelerator(transformer)
    accelerator.set_attention_backend(choose_attention_backend(device))
    loras = random_loras(transformer, mode)
    inputs = make_inputs(transformer, mode, size)

    # As the server: compiled once the slots exist, warmed up with them empty.
    graphs_before = unique_graphs()
    accelerator.compile()
    counter = BlockCounter(transformer.transformer_blocks[0])  # after compile(): outside the compiled code
    reset_peak(device)
    first_step, _, _ = generate(transformer, accelerator, "regular", 1, inputs, counter)
    warm_step = min(generate(transformer, accelerator, "regular", 1, inputs, counter)[0] for _ in range(2))
    compile_peak = peak(device)
    graphs_compiled = unique_graphs() - graphs_before

    switch_times = time_switches(slots, loras, switches, device)

    runs: dict[Preset, PresetRuns] = {}
    for preset in PRESETS:
        runs[preset] = run = PresetRuns()
        reset_peak(device)
        generate(transformer, accelerator, preset, steps, inputs, counter)  # untimed
        for _ in range(repeats):
            seconds, blocks_run, finite = generate(transformer, accelerator, preset, steps, inputs, counter)
            run.seconds.append(seconds)
            run.blocks_run.append(blocks_run)
            run.finite &= finite
        run.peak_bytes = peak(device)

    per_step = {name: statistics.median(run.seconds) / steps for name, run in runs.items()}
    config: Any = transformer.config
    return {
        "mode": mode.name,
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        ),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": str(mode.dtype).removeprefix("torch."),
        "attention_backend": accelerator.attention_backend,
        "params": params,
        "slot_params": slot_params,
        "double_blocks": config.num_layers,
        "single_blocks": config.num_single_layers,
        "heads": config.num_attention_heads,
        "head_dim": config.attention_head_dim,
        "size": size,
        "image_tokens": (size // PATCH) ** 2,
        "text_tokens": mode.text_tokens,
        "steps": steps,
        "repeats": repeats,
        "max_rank": max_rank,
        "lora_rank": LORA_RANK,
        "load_seconds": load_seconds,
        "load_peak_bytes": load_peak,
        "first_step_seconds": first_step,
        "compile_seconds": first_step - warm_step,
        "compile_peak_bytes": compile_peak,
        "compiled_graphs": graphs_compiled,
        "graphs_after_presets": unique_graphs() - graphs_before,
        "presets": {
            name: {
                "seconds_per_step": per_step[name],
                "speedup_vs_none": per_step["none"] / per_step[name],
                "runs_seconds": run.seconds,
                "blocks_run": run.blocks_run,
                "finite": run.finite,
                "peak_bytes": run.peak_bytes,
            }
            for name, run in runs.items()
        },
        "lora_switch_seconds": {
            name: {"median": statistics.median(samples), "samples": samples}
            for name, samples in switch_times.items()
        },
    }


def report(r: dict[str, Any]) -> None:
    """What was measured, then the table, then warnings for anything that would make the numbers wrong."""
    print(
        f"device: {r['device']} | mode: {r['mode']} | torch {r['torch']} | diffusers {r['diffusers']}"
        f" | attention backend: {r['attention_backend']}"
    )
    print(
        f"transformer: {amount(r['params'])} parameters ({r['double_blocks']} double + {r['single_blocks']}"
        f" single blocks, {r['heads']} heads x {r['head_dim']}) in {r['dtype']}; LoRA slots: {NUM_SLOTS} x"
        f" rank {r['max_rank']}, {amount(r['slot_params'])} parameters"
    )
    print(
        f"{r['size']}x{r['size']} -> {r['image_tokens']} image tokens, {r['text_tokens']} text tokens,"
        f" batch 1 | {r['steps']} steps, median of {r['repeats']} runs a preset | graphs compiled:"
        f" {r['compiled_graphs']}, after every preset and LoRA switch: {r['graphs_after_presets']}"
    )
    rows: list[tuple[str, ...]] = [
        ("load: transformer + LoRA slots", f"{r['load_seconds']:.1f} s", "", "", gib(r["load_peak_bytes"])),
        (
            "compile: first `regular` step - a warm one",
            f"{r['compile_seconds']:.1f} s",
            "",
            "",
            gib(r["compile_peak_bytes"]),
        ),
    ]
    for name, numbers in r["presets"].items():
        blocks = "/".join(str(n) for n in sorted(set(numbers["blocks_run"])))
        rows.append(
            (
                f"`{name}`: s/step",
                f"{numbers['seconds_per_step']:.4f} s",
                f"{numbers['speedup_vs_none']:.2f}x",
                f"{blocks} of {r['steps']}",
                gib(numbers["peak_bytes"]),
            )
        )
    for switch, times in r["lora_switch_seconds"].items():
        rows.append(
            (f"LoRA switch {switch} (3 x rank {LORA_RANK})", f"{times['median'] * 1e3:.1f} ms", "", "", "")
        )
    print()
    print_table(rows)
    if r["graphs_after_presets"] != r["compiled_graphs"]:
        extra = r["graphs_after_presets"] - r["compiled_graphs"]
        print(f"WARNING: {extra} more graphs compiled after the warm-up: recompiles")
    for name, numbers in r["presets"].items():
        if not numbers["finite"]:
            print(f"WARNING: `{name}` produced non-finite latents")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reduced", action="store_true", help="the small CPU transformer, even with CUDA")
    parser.add_argument("--steps", type=int, default=28, help="transformer calls per generation")
    parser.add_argument("--size", type=int, help="image side in pixels (1024; reduced: 256)")
    parser.add_argument("--max-rank", type=int, default=128, help="LoRA slot rank (the server's default)")
    parser.add_argument("--repeats", type=int, help="timed runs per preset (3; reduced: 2)")
    parser.add_argument("--switches", type=int, help="timed LoRA switch cycles (5)")
    parser.add_argument("--json", type=Path, help="also write the numbers here as JSON")
    args = parser.parse_args()

    mode = REDUCED if args.reduced or not torch.cuda.is_available() else FULL
    size = args.size or mode.size
    repeats = args.repeats or mode.repeats
    switches = args.switches or mode.switches
    if size <= 0 or size % PATCH:
        parser.error(f"--size must be a positive multiple of {PATCH}")
    if min(args.steps, repeats, switches) < 1 or args.max_rank < LORA_RANK:
        parser.error(f"--steps, --repeats and --switches must be at least 1, --max-rank at least {LORA_RANK}")
    if mode is REDUCED and not args.reduced:
        print("no CUDA device: running the reduced transformer on the CPU")
    result = measure(mode, size, args.steps, repeats, switches, args.max_rank)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
