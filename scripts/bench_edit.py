"""What an edit costs beyond text-to-image, and whether caching encoded reference latents would pay,
measured side by side in one run on the tiny model (CPU here; the same script runs on a GPU).

Per reference count (0 = text-to-image): the median time of one whole request through the worker's own
`ImageGenerator`, and of the VAE encoding of its references alone (`prepare_image_latents`, what a
latent cache by content hash would save). Then the HTTP side's decode-and-scale of large photos
(`decode_reference`), which happens before queueing, off the GPU's path.

    .venv/bin/python scripts/bench_edit.py [-n 5] [--steps 28] [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.messages import GenerationParams, Job, WorkerConfig
from pipeline.models import PACKAGED_REGISTRY, load_registry
from pipeline.worker import load_generator
from server.config import Settings
from server.fetch.image_decode import decode_reference, encode_png


def median_seconds(action: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5, help="runs per figure (the median is printed)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=512, help="output and reference side, in pixels")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    config = WorkerConfig(load_registry(PACKAGED_REGISTRY), args.model, Settings.load().cache_dir)
    generator, ready = load_generator(replace(config, warmup_sizes=()))
    pipe = generator.pipe
    size = f"{args.size}x{args.size}"
    print(f"model {ready.model} on {ready.device}, {args.steps} steps at {size}, median of {args.n}")
    params = GenerationParams("a lighthouse at dusk", args.size, args.size, args.steps, 2.5, seed=1)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for i in range(4):
            path = Path(folder) / f"{i}.png"
            path.write_bytes(encode_png(photo(args.size, args.size, seed=i)))
            files.append(str(path))
        for count in (0, 1, 2, 4):
            job = Job("bench", params, (), tuple(files[:count]))
            request = median_seconds(
                lambda job=job: generator.generate(job, lambda s, t: None, lambda: False), args.n
            )
            encode = 0.0
            if count:
                images = [
                    pipe.image_processor.preprocess(Image.open(f).convert("RGB")) for f in files[:count]
                ]

                def encode_references(images: list[torch.Tensor] = images) -> object:
                    with torch.inference_mode():
                        generator_ = torch.Generator("cpu").manual_seed(0)
                        return pipe.prepare_image_latents(
                            images, 1, generator_, pipe._execution_device, pipe.vae.dtype
                        )

                encode = median_seconds(encode_references, args.n)
            rows.append({"references": count, "request_seconds": request, "encode_seconds": encode})

    base = rows[0]["request_seconds"]
    print(f"{'references':>10} {'request s':>10} {'vs t2i':>7} {'VAE encode s':>13} {'share':>6}")
    for row in rows:
        share = row["encode_seconds"] / row["request_seconds"]
        row["vs_text_to_image"], row["encode_share"] = row["request_seconds"] / base, share
        print(
            f"{row['references']:>10} {row['request_seconds']:>10.3f} {row['vs_text_to_image']:>6.2f}x "
            f"{row['encode_seconds']:>13.4f} {share:>6.1%}"
        )

    decoding = []
    for width, height, fmt in ((4000, 3000, "JPEG"), (8192, 6144, "JPEG"), (8192, 6144, "PNG")):
        buffer = io.BytesIO()
        photo(width, height, seed=9).save(buffer, format=fmt)
        data = buffer.getvalue()
        seconds = median_seconds(
            lambda data=data: encode_png(decode_reference(data, 64_000_000)), max(1, args.n // 2)
        )
        decoding.append({"pixels": width * height, "format": fmt, "bytes": len(data), "seconds": seconds})
        what = f"a {width * height / 1e6:.0f} MP {fmt} ({len(data) / 2**20:.1f} MiB)"
        print(f"HTTP side: decode + scale + PNG of {what}: {seconds:.2f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"model": ready.model, "device": ready.device, "rows": rows, "decoding": decoding})
        )


if __name__ == "__main__":
    main()
