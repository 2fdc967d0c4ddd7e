"""Scale-out figures, side by side in one run: `flux2-server serve --ray` on the tiny model with one and two
CPU worker replicas, and with two replicas routed by LoRA set or by Ray Serve's default routing.

The same workload goes to each: a fixed random sequence of requests over several LoRAs (each its own set),
sent through the real `fal_client`, first one at a time (replicas to spare: routing chooses), then several
at once (every replica busy: a request takes the one that frees up). Each replica's LoRA memory cache holds
half of the LoRAs, so where a request lands decides whether its LoRA must be read again. Printed per
configuration and load: throughput, p50/p95 latency, and the share of requests whose replica already held
their LoRA in memory (`flux2_lora_sets_started_total` on `/metrics`).

    .venv/bin/python scripts/bench_scaleout.py [--requests 36] [--loras 6] [--concurrency 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import fal_client
import fal_client.client
import httpx
from diffusers import Flux2Transformer2DModel

from pipeline.testing import linear_shapes, write_lora
from pipeline.tiny import ensure_tiny_pipeline
from server.config import Settings
from server.testing import LiveServer

APP = "fal-ai/flux-2/lora"
CONFIGS = [  # (label, worker replicas, route by LoRA set)
    ("1 replica", 1, True),
    ("2 replicas, by LoRA set", 2, True),
    ("2 replicas, Ray's default routing", 2, False),
]


@dataclass
class Row:
    config: str
    concurrency: int  # requests in flight at once
    requests: int
    seconds: float
    throughput: float  # requests per second
    p50: float
    p95: float
    held: int  # requests whose replica already held their LoRA in memory
    read: int  # ... and those that had to read it


def write_loras(folder: Path, count: int, cache_dir: Path) -> list[Path]:
    transformer = Flux2Transformer2DModel.from_pretrained(
        ensure_tiny_pipeline(cache_dir / "tiny") / "transformer"
    )
    shapes = linear_shapes(transformer)
    return [
        write_lora(folder / f"lora{i}.safetensors", shapes, list(shapes), rank=16, seed=i)
        for i in range(count)
    ]


def lora_counts(server: LiveServer) -> tuple[int, int]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counts = {"true": 0, "false": 0}
    for held, value in re.findall(
        r'^flux2_lora_sets_started_total\{held="(\w+)"\} (\S+)$', text, re.MULTILINE
    ):
        counts[held] = int(float(value))
    return counts["true"], counts["false"]


def measure(
    label: str, workers: int, affinity: bool, loras: list[Path], order: list[int], args: argparse.Namespace
) -> list[Row]:
    """One server in this configuration; the workload sent one request at a time, then several at once."""
    env = {
        "FLUX2_CACHE_DIR": str(args.cache_dir),
        "FLUX2_LORA_FOLDERS": str(loras[0].parent),
        "FLUX2_MAX_LORA_RANK": "16",
        # Each replica keeps half of the LoRAs parsed in memory (float32 there, as in the files), and is
        # routed as holding as many.
        "FLUX2_LORA_MEMORY_MAX_BYTES": str(loras[0].stat().st_size * (len(loras) // 2)),
        "FLUX2_RAY_LORA_SETS_PER_WORKER": str(len(loras) // 2),
        "FLUX2_RAY_WORKERS_MIN": str(workers),
        "FLUX2_RAY_WORKERS_MAX": str(workers),
        "FLUX2_RAY_GPUS_PER_WORKER": "0",
        "FLUX2_RAY_LORA_AFFINITY": str(affinity).lower(),
    }
    with (
        tempfile.TemporaryDirectory() as data,
        LiveServer(Path(data), "--ray", "--model", "tiny", env=env) as server,
    ):
        fal_client.client.RUN_URL_FORMAT = f"{server.url}/"
        fal_client.client.QUEUE_URL_FORMAT = f"{server.url}/queue/"
        client = fal_client.SyncClient(key="local")
        body = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": args.steps}
        client.run(APP, body)  # warm: the first run of each replica's pipeline is slower

        def one(index: int) -> float:
            started = time.perf_counter()
            client.run(APP, {**body, "loras": [{"path": str(loras[index]), "scale": 1.0}]})
            return time.perf_counter() - started

        rows = []
        for concurrency in (1, args.concurrency):
            held_before, read_before = lora_counts(server)
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                latencies = sorted(pool.map(one, order))
            seconds = time.perf_counter() - started
            held, read = lora_counts(server)
            rows.append(
                Row(
                    label,
                    concurrency,
                    len(order),
                    seconds,
                    len(order) / seconds,
                    statistics.median(latencies),
                    latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
                    held - held_before,
                    read - read_before,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--loras", type=int, default=6, help="distinct LoRAs (sets) in the workload")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows to this file as JSON")
    args = parser.parse_args()
    args.cache_dir = Settings.load().cache_dir
    draw = random.Random(args.seed)
    order = [draw.randrange(args.loras) for _ in range(args.requests)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        loras = write_loras(Path(folder), args.loras, args.cache_dir)
        for label, workers, affinity in CONFIGS:
            rows.extend(measure(label, workers, affinity, loras, order, args))
            print(f"done: {label}", flush=True)
    print(
        f"\n{args.requests} requests over {args.loras} LoRAs (each replica holds {args.loras // 2} in "
        f"memory), {args.steps} steps, 512x512, tiny model on CPU replicas; the same sequence one at a "
        f"time, then {args.concurrency} at a time, on the same server\n"
    )
    print("| configuration | in flight | throughput | vs 1 replica | p50 | p95 | LoRA already held |")
    print("|---|---|---|---|---|---|---|")
    base = {r.concurrency: r.throughput for r in rows if r.config == CONFIGS[0][0]}
    for r in rows:
        share = r.held / max(1, r.held + r.read)
        ratio = r.throughput / base[r.concurrency]
        print(
            f"| {r.config} | {r.concurrency} | {r.throughput:.2f} req/s | {ratio:.2f}x "
            f"| {r.p50:.2f} s | {r.p95:.2f} s | {r.held} of {r.held + r.read} ({share:.0%}) |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
