"""What a LoRA switch costs, each way of doing it measured side by side in one run.

Section 1, the tiny model (CPU here): switching between sets of one to three LoRAs (ranks 16, 32 and 64 on
every Linear of the transformer), interleaved so that every path sees the same machine state:
  (a) the worker's warm path: `LoraMemoryCache` hit + `LoraSlots.apply`;
  (b) the disk cache: the blob parsed again with the project's reader + `LoraSlots.apply`;
  (c) cold: a fresh `LoraFetcher` cache downloads the files from an HTTP server on 127.0.0.1, + (b);
  (d) the plain diffusers way on a separate slot-less pipeline: `unload_lora_weights`, `load_lora_weights`
      for each LoRA, `set_adapters`.
Section 2, the real FLUX.2-dev layer shapes without the base model: a random rank-64 bf16 LoRA on every
attention and feed-forward Linear of every block (diffusers format, written to a temp dir and deleted), timed
through safetensors loading, the project's parse/convert, validation, and the copy into one rank-128 bf16
slot; plus `LoraSlots.apply` itself on a real-shaped transformer cut down to one block of each kind.
Section 3, the same cut-down transformer with three bf16 rank-128 slots, switches interleaved: three rank-64
LoRAs from the host-memory cache vs from the device tier (on CPU the "device" is host memory too, so only
the conversion done once on entry shows: float32 files gain, bf16 ones cannot), and three rank-16 LoRAs with
every slot zeroed first (as before) vs only the rows they use written.

    .venv/bin/python scripts/bench_lora.py [-n 30] [--real-n 3] [--real-blocks N] [--tier-n 20]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig

from pipeline.lora_cache import LoraMemoryCache, lora_bytes
from pipeline.lora_device_tier import LoraDeviceTier
from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraSlots, ParsedLora
from pipeline.testing import linear_shapes, load_tiny, render, write_lora
from pipeline.tiny import ensure_tiny_pipeline
from server.config import Settings
from server.fetch.lora_fetcher import LocalLora, LoraFetcher, LoraPolicy

MB = 1024**2
TINY_RANKS = {"style16": 16, "detail32": 32, "light64": 64}  # adapter names must not be nn.Module attributes
# Each path cycles through these, so every timed call really switches to another set.
TINY_SETS: list[tuple[tuple[str, float], ...]] = [
    (("style16", 1.0), ("detail32", 0.8), ("light64", 0.6)),
    (("light64", 1.0), ("style16", -0.5)),
    (("detail32", 1.2),),
]
REAL_RANK = 64
SLOT_RANK = 128  # the server's default max_rank: the slot the real-shaped LoRA is copied into
Sets = Sequence[tuple[str, float]]


class QuietFileServer:
    """A static file server on loopback (a thread of this process)."""

    def __init__(self, root: Path) -> None:
        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def stopwatch(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def tiny_section(n: int, work: Path) -> None:
    cache_dir = Settings.load().cache_dir
    folder = ensure_tiny_pipeline(cache_dir / "tiny")
    pipe, naive = load_tiny(cache_dir), load_tiny(cache_dir)
    shapes = linear_shapes(pipe.transformer)
    served = work / "served"
    for seed, (name, rank) in enumerate(TINY_RANKS.items()):
        write_lora(served / f"{name}.safetensors", shapes, list(shapes), rank=rank, seed=seed)
    max_rank = max(TINY_RANKS.values())
    slots = LoraSlots(pipe.transformer, num_slots=3, max_rank=max_rank)  # eager default: skip_empty
    # The compiled server's setting (every slot always active) on a third copy of the transformer.
    all_active = LoraSlots(
        Flux2Transformer2DModel.from_pretrained(folder / "transformer"), 3, max_rank, skip_empty=False
    )
    server = QuietFileServer(served)
    urls = {name: f"{server.url}/{name}.safetensors" for name in TINY_RANKS}
    loop = asyncio.new_event_loop()  # one loop, as the server's fetcher lives on one

    def fetch(cache_dir: Path, names: Sequence[str]) -> list[LocalLora]:
        async def run() -> list[LocalLora]:
            fetcher = LoraFetcher(LoraPolicy(cache_dir=cache_dir, allow_private_addresses=True))
            try:
                return await fetcher.fetch_all([urls[name] for name in names])
            finally:
                await fetcher.aclose()

        return loop.run_until_complete(run())

    # The disk cache as the server leaves it: content-addressed blobs fetched once.
    blobs = {lora.source: lora for lora in fetch(work / "disk-cache", list(TINY_RANKS))}
    cached = {name: blobs[urls[name]] for name in TINY_RANKS}
    memory = LoraMemoryCache(max_bytes=1024**3)

    def from_memory(sets: Sets, slots: LoraSlots = slots) -> float:
        def switch() -> None:
            parsed = [
                (memory.get(cached[n].sha256, partial(read_lora_file, cached[n].file, n)), s) for n, s in sets
            ]
            slots.apply(parsed)

        return stopwatch(switch)

    def from_disk(sets: Sets) -> float:
        return stopwatch(lambda: slots.apply([(read_lora_file(cached[n].file, n), s) for n, s in sets]))

    cold_dirs = iter(range(10**9))

    def cold(sets: Sets) -> float:
        cache_dir = work / f"cold-{next(cold_dirs)}"  # fresh: every file is downloaded again

        def switch() -> None:
            local = fetch(cache_dir, [n for n, _ in sets])
            slots.apply([(read_lora_file(lo.file, n), s) for lo, (n, s) in zip(local, sets, strict=True)])

        elapsed = stopwatch(switch)
        shutil.rmtree(cache_dir)
        return elapsed

    def diffusers_way(sets: Sets) -> float:
        def switch() -> None:
            naive.unload_lora_weights()
            for name, _ in sets:
                naive.load_lora_weights(str(cached[name].file), adapter_name=name)
            naive.set_adapters([n for n, _ in sets], [s for _, s in sets])

        return stopwatch(switch)

    paths: dict[str, Callable[[Sets], float]] = {
        "(a) memory cache + LoraSlots.apply": from_memory,
        "(a') the same, skip_empty=False (compiled)": partial(from_memory, slots=all_active),
        "(b) disk cache: read_lora_file + apply": from_disk,
        "(c) cold: HTTP fetch + read + apply": cold,
        "(d) diffusers unload/load/set_adapters": diffusers_way,
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        with warnings.catch_warnings():
            # diffusers' loader warns on each adapter after the first that a peft_config exists: expected.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for sets in TINY_SETS:  # warm-up: first calls import, allocate and fill the memory cache
                for call in paths.values():
                    call(sets)
            # Sanity: both pipelines hold TINY_SETS[-1] now and must draw the same image.
            difference = float(np.abs(render(pipe) - render(naive)).max())
            generation = statistics.median(stopwatch(lambda: render(pipe)) for _ in range(3))
            for i in range(n):
                # Path k starts at another set than path k-1, so the shared slots always change content.
                for k, (name, call) in enumerate(paths.items()):
                    times[name].append(call(TINY_SETS[(i + k) % len(TINY_SETS)]))
    finally:
        server.close()
        loop.close()

    sizes = ", ".join(f"{n} {cached[n].size / 1024:.0f} KB" for n in TINY_RANKS)
    print(f"\n1. LoRA switch, tiny FLUX.2 on {torch.get_num_threads()} CPU threads: {n} switches a path")
    print(f"   LoRAs on all {len(shapes)} Linears ({sizes}); sets of 1-3; slots rank {slots.max_rank}")
    print(f"   slots vs diffusers image after the same set: max |diff| {difference:.1e}")
    print(f"   for scale: one 512x512 4-step generation takes {generation * 1e3:.0f} ms")
    memory_median = statistics.median(times["(a) memory cache + LoraSlots.apply"])
    print(f"{'path':44} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'x (a)':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        p10, *_, p90 = statistics.quantiles(samples, n=10)
        ratio = median / memory_median
        print(f"{name:44} {median * 1e3:10.2f} {p10 * 1e3:8.2f} {p90 * 1e3:8.2f} {ratio:8.1f}")
    ratio = statistics.median(times["(d) diffusers unload/load/set_adapters"]) / memory_median
    print(f"naive diffusers / memory cache: {ratio:.1f}x (target >= 10x)")


# ------------------------------------------------------------------------------------- real FLUX.2 shapes

Pairs = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]  # {module: (A, B, alpha / rank)}
Slot = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (slot A, slot B)}
BLOCK = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.(\d+)\.")
FIRST_BLOCK = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.0\.")


def real_linears(blocks: int | None) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """({name: (in, out)} of every Linear, the same for those inside the blocks) of FLUX.2-dev's transformer.

    diffusers' defaults are the dev model's (8 double and 48 single blocks, 48 heads x 128); built on the
    meta device, so no 64 GB of weights. Inside a block every Linear is attention or feed-forward (norms are
    not Linears). `blocks` keeps only the first N blocks of each kind."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel()
    every, in_blocks = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        found = BLOCK.match(name)
        if found and blocks is not None and int(found[1]) >= blocks:
            continue
        every[name] = (module.in_features, module.out_features)
        if found:
            in_blocks[name] = every[name]
    return every, in_blocks


def write_real_lora(path: Path, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Random bf16 LoRA saved the way diffusers saves one, with its LoraConfig (alpha) in the header."""
    generator = torch.Generator().manual_seed(0)
    layers: dict[str, torch.nn.Module | torch.Tensor] = {}
    for name, (in_features, out_features) in shapes.items():
        layers[f"{name}.lora_A.weight"] = torch.randn(REAL_RANK, in_features, generator=generator).bfloat16()
        layers[f"{name}.lora_B.weight"] = torch.randn(out_features, REAL_RANK, generator=generator).bfloat16()
    config = LoraConfig(
        r=REAL_RANK,
        lora_alpha=REAL_RANK // 2,  # alpha / rank = 0.5: the header alpha must reach the slot
        target_modules="^(?:" + "|".join(re.escape(name) for name in shapes) + ")$",
    )
    Flux2Pipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=layers,
        weight_name=path.name,
        transformer_lora_adapter_metadata=config.to_dict(),
    )


def plain_slot(shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One slot's preallocated rank-128 bf16 A (r, in) and B (out, r), as peft holds them on a bf16 model."""
    return {
        name: (
            torch.zeros(SLOT_RANK, in_features, dtype=torch.bfloat16),
            torch.zeros(out_features, SLOT_RANK, dtype=torch.bfloat16),
        )
        for name, (in_features, out_features) in shapes.items()
    }


def lora_pairs(lora: ParsedLora) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    pairs = {}
    for key, lora_A in lora.state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            alpha = lora.state_dict.get(f"{module}.alpha")
            factor = 1.0 if alpha is None else float(alpha) / lora_A.shape[0]
            lora_B = lora.state_dict[f"{module}.lora_B.weight"]
            pairs[module.removeprefix("transformer.")] = (lora_A, lora_B, factor)
    return pairs


def write_slot(slot: Slot, pairs: Pairs) -> None:
    """What LoraSlots._write does for one slot: zero all of it, copy A, scale B in float32 and copy it."""
    with torch.no_grad():
        for slot_A, slot_B in slot.values():
            slot_A.zero_()
            slot_B.zero_()
        for module, (lora_A, lora_B, factor) in pairs.items():
            slot_A, slot_B = slot[module]
            rank = lora_A.shape[0]
            slot_A[:rank].copy_(lora_A)
            slot_B[:, :rank].copy_(lora_B.to(dtype=torch.float32) * factor)


class Rows:
    """Timed steps: {name: (seconds per run, MB the step moves)}."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[list[float], float]] = {}

    def measure(self, name: str, mb: float, call: Callable[[], object]) -> None:
        self.rows.setdefault(name, ([], mb))[0].append(stopwatch(call))

    def print_table(self) -> None:
        print(f"{'step':48} {'median ms':>10} {'min ms':>8} {'MB':>8} {'GB/s':>7}")
        for name, (samples, mb) in self.rows.items():
            median = statistics.median(samples)
            ms = f"{median * 1e3:10.1f} {min(samples) * 1e3:8.1f}"
            print(f"{name:48} {ms} {mb:8.0f} {mb / 1024 / median:7.2f}")


def time_real_lora(rows: Rows, n: int, path: Path, slot: Slot, slot_mb: float) -> ParsedLora:
    file_mb = path.stat().st_size / MB
    parsed = read_lora_file(path)  # warm-up: imports and header parsing
    assert {factor for _, _, factor in lora_pairs(parsed).values()} == {0.5}, "header alpha lost"
    for _ in range(n):
        # safetensors maps the file: loading is lazy, the pages are read at the first touch of each tensor.
        rows.measure(
            "safetensors load_file (lazy mmap)", file_mb, lambda: safetensors.torch.load_file(str(path))
        )
        # Once per LoRA (then it sits in the memory cache): read, convert, check every weight is finite.
        rows.measure("read_lora_file (once per LoRA)", file_mb, lambda: read_lora_file(path))
        pairs = lora_pairs(parsed)
        # Every switch from the memory cache: the slot copy.
        rows.measure(
            f"write 1 slot (rank {SLOT_RANK} bf16, all Linears)", slot_mb, partial(write_slot, slot, pairs)
        )
    return parsed


def one_block_model() -> Flux2Transformer2DModel:
    """FLUX.2-dev's transformer in bf16, cut to one block of each kind (2.3 B parameters, allocated with
    to_empty and never initialised: only its LoRA slots are touched)."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice on float32 modules concerns loading, not this
    allocated: Flux2Transformer2DModel = model.to(torch.bfloat16).to_empty(device="cpu")
    diffusers_logging.set_verbosity(verbosity)
    return allocated


def time_slots_on_real_model(rows: Rows, n: int, parsed: ParsedLora) -> str:
    """LoraSlots itself on FLUX.2-dev shapes (`one_block_model`) with the LoRA's modules of block 0.
    Returns the slots' dtype."""
    model = one_block_model()
    emulated = plain_slot(linear_shapes(model))
    subset = ParsedLora(
        name="rank64, block 0 of each kind",
        state_dict={
            k: v for k, v in parsed.state_dict.items() if FIRST_BLOCK.match(k.removeprefix("transformer."))
        },
        finite=True,  # as read_lora_file marks it
    )
    pairs = lora_pairs(subset)
    lora_mb = sum(a.nbytes + b.nbytes for a, b, _ in pairs.values()) / MB
    for skip_empty in (True, False):
        slots = LoraSlots(model, num_slots=3, max_rank=SLOT_RANK, skip_empty=skip_empty)
        slots.apply([(subset, 1.0)])  # warm-up
        name = f"LoraSlots.apply, 1+1 blocks, skip_empty={skip_empty}"
        for _ in range(n):
            rows.measure(name, lora_mb, partial(slots.apply, [(subset, 1.0)]))
        dtype = str(next(iter(slots._params[0].values()))[0].dtype)
        model.unload_lora()  # type: ignore[no-untyped-call]  # LoraSlots must own every adapter of a model: start the next one bare

    for _ in range(n):
        rows.measure("  same model: the write alone, emulated", lora_mb, partial(write_slot, emulated, pairs))
    return dtype


def real_section(n: int, blocks: int | None, work: Path) -> None:
    every, in_blocks = real_linears(blocks)
    double = len({m.split(".")[1] for m in in_blocks if m.startswith("transformer_blocks.")})
    single = len({m.split(".")[1] for m in in_blocks if m.startswith("single_transformer_blocks.")})
    path = work / "real" / "flux2-dev-rank64.safetensors"
    written = stopwatch(lambda: write_real_lora(path, in_blocks))
    file_mb = path.stat().st_size / MB
    rows = Rows()
    slot = plain_slot(every)
    slot_mb = sum(a.nbytes + b.nbytes for a, b in slot.values()) / MB
    parsed = time_real_lora(rows, n, path, slot, slot_mb)
    del slot
    dtype = time_slots_on_real_model(rows, n, parsed)

    print(
        f"\n2. One rank-{REAL_RANK} bf16 LoRA, real FLUX.2-dev shapes, on every Linear of {double} double +"
        f" {single} single blocks ({len(in_blocks)} modules), {n} runs, {torch.get_num_threads()} CPU threads"
    )
    print(
        f"   file {file_mb:.0f} MB (random weights written in {written:.1f} s, read from the page cache);"
        f" one rank-{SLOT_RANK} slot on all {len(every)} Linears {slot_mb:.0f} MB; LoraSlots dtype {dtype}"
    )
    rows.print_table()


# ------------------------------------------------------------------------ device tier and rank rows (CPU)

Switch = Callable[[Sequence[str]], object]


def random_lora(
    name: str, shapes: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype, seed: int
) -> ParsedLora:
    """A LoRA as `read_lora_file` leaves one: prefixed keys, alphas (alpha / rank = 0.5), checked finite."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module, (in_features, out_features) in shapes.items():
        key = f"transformer.{module}"
        state[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator).to(dtype)
        state[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator).to(dtype)
        state[f"{key}.alpha"] = torch.tensor(rank / 2)
    return ParsedLora(name, state, finite=True)


def tier_section(n: int) -> None:
    model = one_block_model()
    shapes = {m: s for m, s in linear_shapes(model).items() if FIRST_BLOCK.match(m)}
    slots = LoraSlots(model, num_slots=3, max_rank=SLOT_RANK, skip_empty=False, dtype=torch.bfloat16)
    memory = LoraMemoryCache(max_bytes=8 * 1024**3)
    tier = LoraDeviceTier(8 * 1024**3, slots.device, slots.dtype)
    scales = (1.0, 0.8, -0.6)
    made = iter(range(10**9))

    def two_sets(rank: int, dtype: torch.dtype) -> tuple[list[str], list[str]]:
        """Two sets of three LoRAs, in the memory cache: alternated, every switch changes every slot."""
        first, second = ([f"rank {rank} {dtype} {s}{i}" for i in range(3)] for s in "AB")
        for name in first + second:
            memory.get(name, partial(random_lora, name, shapes, rank, dtype, next(made)))
        return first, second

    def from_memory(names: Sequence[str]) -> list[tuple[ParsedLora, float]]:
        # Every one is a hit: `make` is never called.
        return [(memory.get(n, partial(ParsedLora, n, {})), s) for n, s in zip(names, scales, strict=True)]

    def from_tier(names: Sequence[str]) -> list[tuple[ParsedLora, float]]:
        return [(tier.resident(lora.name, lora), scale) for lora, scale in from_memory(names)]

    def every_slot_zeroed_first(names: Sequence[str]) -> None:
        """The write as it was: each slot zeroed whole, then the LoRAs copied in."""
        with torch.no_grad():
            for slot in slots._params:
                for slot_A, slot_B in slot.values():
                    slot_A.zero_()
                    slot_B.zero_()
        slots.apply(from_memory(names))

    def mb(loras: Sequence[tuple[ParsedLora, float]]) -> float:
        return sum(lora_bytes(lora) for lora, _ in loras) / MB

    def slot_contents() -> list[torch.Tensor]:
        return [param for slot in slots._params for pair in slot.values() for param in pair]

    slot_mb = sum(param.nbytes for param in slot_contents()) / MB
    paths: dict[str, tuple[float, tuple[list[str], list[str]], Switch]] = {}
    pairs: list[tuple[str, str]] = []  # (before, after) compared below
    for dtype in (torch.bfloat16, torch.float32):
        sets = two_sets(REAL_RANK, dtype)
        kind = f"3 x rank {REAL_RANK} {str(dtype).removeprefix('torch.')}"
        host_mb, tier_mb = mb(from_memory(sets[0])), mb(from_tier(sets[0]) + from_tier(sets[1]))  # fills it
        paths[f"{kind}: host-memory hit"] = (host_mb, sets, lambda ns: slots.apply(from_memory(ns)))
        paths[f"{kind}: device-tier hit"] = (tier_mb / 2, sets, lambda ns: slots.apply(from_tier(ns)))
        pairs.append((f"{kind}: host-memory hit", f"{kind}: device-tier hit"))
    narrow = two_sets(16, torch.bfloat16)
    used_mb = mb(from_memory(narrow[0]))  # bf16 in memory as in the slots: the bytes the copy writes
    paths["3 x rank 16: every slot zeroed, then written"] = (
        slot_mb + used_mb,
        narrow,
        every_slot_zeroed_first,
    )
    paths["3 x rank 16: only the rows they use"] = (used_mb, narrow, lambda ns: slots.apply(from_memory(ns)))
    pairs.append(("3 x rank 16: every slot zeroed, then written", "3 x rank 16: only the rows they use"))

    # Sanity: a tier hit writes the bits a host-memory hit writes (float32 LoRAs: A converted on entry).
    slots.apply(from_memory(sets[1]))
    from_host = [param.clone() for param in slot_contents()]
    slots.apply(from_tier(sets[0]))
    slots.apply(from_tier(sets[1]))
    identical = all(torch.equal(p, q) for p, q in zip(from_host, slot_contents(), strict=True))
    del from_host

    rows = Rows()
    for i in range(n + 1):  # the first round is a warm-up
        for name, (size_mb, sets, switch) in paths.items():
            if i:
                rows.measure(name, size_mb, partial(switch, sets[i % 2]))
            else:
                switch(sets[0])
    print(
        f"\n3. Switch tiers and rank rows: {len(shapes)} modules of FLUX.2-dev's block 0 of each kind; 3 bf16"
        f" rank-{SLOT_RANK} slots on all {len(slots.target_modules)} Linears ({slot_mb:.0f} MB); {n} switches"
        f" a path, {torch.get_num_threads()} CPU threads; the device tier is host memory here"
    )
    print(f"   tier hit vs host-memory hit, slot contents: {'identical' if identical else 'DIFFERENT'} bits")
    rows.print_table()
    median = {name: statistics.median(samples) for name, (samples, _) in rows.rows.items()}
    for before, after in pairs:
        print(f"{after} / {before.split(': ')[1]}: {median[after] / median[before]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=30, help="switches per path on the tiny model")
    parser.add_argument("--real-n", type=int, default=3, help="runs per step with the real shapes")
    parser.add_argument("--tier-n", type=int, default=20, help="switches per path in the tier section")
    parser.add_argument(
        "--real-blocks",
        type=int,
        default=None,
        help="use only the first N double and N single blocks for the real shapes (memory; default: all)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as work:
        tiny_section(args.n, Path(work))
        real_section(args.real_n, args.real_blocks, Path(work))
    tier_section(args.tier_n)


if __name__ == "__main__":
    main()
