"""What an edit's reference images cost, measured side by side in one run on the tiny model (CPU here).

1. The HTTP side, per reference: the fetch stage's own `ReferenceFetcher` taking 1-megapixel PNGs from a
   file server on loopback (download, decode, scale, write the pixels, store), for 1 and 4 references, beside
   the decode-scale-encode alone. Target: at most 50 ms per reference.
2. End to end: the same edit through a live server (real `fal_client`, references as loopback URLs) and
   as a direct `Flux2Pipeline(image=...)` call with the decoded images, interleaved; the difference is
   what the server adds.
3. The worker's side: encoding the references with the VAE (`prepare_image_latents`), what a latent
   cache by content hash could save, beside the whole generation.

    .venv/bin/python scripts/bench_edit.py [-n 5] [--steps 4] [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import numpy as np
import torch
from PIL import Image

from pipeline.generation import pipeline_kwargs
from pipeline.testing import load_tiny
from server.config import Settings
from server.fetch.disk_cache import DiskCache
from server.fetch.downloads import Downloader, DownloadPolicy
from server.fetch.image_decode import decode_reference, encode_raw
from server.fetch.reference_images import ReferenceFetcher, ReferencePolicy
from server.files import FileStore
from server.schemas import Flux2EditInput
from server.store.database import Database, sqlite_url
from server.testing import LiveServer

COUNTS = (1, 4)


def median_seconds(action: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def photo(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8)
    noisy = np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = noisy + rng.integers(-6, 7, noisy.shape)  # camera noise: PNG does not shrink it away
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def http_side(urls: list[str], pngs: list[bytes], folder: Path, n: int) -> dict[str, float]:
    """ms per reference: the fetcher's whole work, and decode-scale-encode alone."""
    database = Database(sqlite_url(folder / "files.sqlite"))
    database.migrate()
    files = FileStore(folder / "files", database)
    figures: dict[str, float] = {}

    async def run() -> None:
        downloads = Downloader(
            DownloadPolicy(2**30, allow_private_addresses=True), DiskCache(folder / "c", 2**30)
        )
        fetcher = ReferenceFetcher(ReferencePolicy(), downloads, files)
        for count in COUNTS:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                stored = await fetcher.fetch_all(urls[:count], None, ())
                times.append(time.perf_counter() - started)
                await fetcher.release(stored)
            figures[f"fetch_ms_per_reference_{count}"] = statistics.median(times) / count * 1000
        await downloads.aclose()

    asyncio.run(run())
    figures["decode_scale_encode_ms"] = (
        median_seconds(lambda: encode_raw(decode_reference(pngs[0], 64_000_000)), n) * 1000
    )
    database.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5, help="runs per figure (the median is printed)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--size", type=int, default=512, help="output side in pixels, 512+ (references are 1 MP)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result: dict[str, Any] = {"n": args.n, "steps": args.steps, "size": args.size}

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "refs").mkdir()
        pngs = []
        for i in range(max(COUNTS)):
            buffer = io.BytesIO()
            photo(1024, seed=i).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
            (folder / "refs" / f"{i}.png").write_bytes(pngs[-1])
        httpd, base = serve_folder(folder / "refs")
        urls = [f"{base}/{i}.png" for i in range(max(COUNTS))]

        result["http"] = http_side(urls, pngs, folder, args.n)
        print(f"1-megapixel PNG references ({len(pngs[0]) / 2**20:.1f} MiB each), median of {args.n}")
        for count in COUNTS:
            per = result["http"][f"fetch_ms_per_reference_{count}"]
            print(f"  HTTP side, {count} reference(s): {per:.1f} ms per reference (target <= 50)")
        print(f"  of which decode + scale + write: {result['http']['decode_scale_encode_ms']:.1f} ms")

        pipe = load_tiny(Settings.load().cache_dir)
        decoded = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        env = {"FLUX2_CACHE_DIR": str(Settings.load().cache_dir), "FLUX2_ALLOW_PRIVATE_LORA_URLS": "true"}
        with LiveServer(folder / "server", "--model", "tiny", env=env) as server:
            fal_client.client.RUN_URL_FORMAT = f"{server.url}/"
            client = fal_client.SyncClient(key="bench")
            rows = []
            for count in COUNTS:
                body = {
                    "prompt": "the same scene at night",
                    "image_urls": urls[:count],
                    "image_size": {"width": args.size, "height": args.size},
                    "num_inference_steps": args.steps,
                    "seed": 1,
                }
                params = Flux2EditInput.model_validate(body).to_params()

                def direct(count: int = count, params: Any = params) -> object:
                    with torch.inference_mode():
                        return pipe(**pipeline_kwargs(params, decoded[:count])).images[0]

                def served(body: dict[str, Any] = body) -> object:
                    return client.run("fal-ai/flux-2/edit", body)

                served()  # warm: the worker's first edit
                direct_times, served_times = [], []
                for _ in range(args.n):  # interleaved: both see the same machine state
                    direct_times.append(median_seconds(direct, 1))
                    served_times.append(median_seconds(served, 1))
                images = [pipe.image_processor.preprocess(image) for image in decoded[:count]]

                def encode(images: list[torch.Tensor] = images) -> object:
                    with torch.inference_mode():
                        generator = torch.Generator("cpu").manual_seed(0)
                        return pipe.prepare_image_latents(
                            images, 1, generator, pipe._execution_device, pipe.vae.dtype
                        )

                row = {
                    "references": count,
                    "direct_s": statistics.median(direct_times),
                    "server_s": statistics.median(served_times),
                    "vae_encode_s": median_seconds(encode, args.n),
                }
                row["server_adds_s"] = row["server_s"] - row["direct_s"]
                rows.append(row)
                times = f"direct {row['direct_s']:.3f} s, server {row['server_s']:.3f} s"
                added = f"+{row['server_adds_s'] * 1000:.0f} ms, {row['server_s'] / row['direct_s']:.2f}x"
                encoding = f"the worker's VAE encoding of the references: {row['vae_encode_s'] * 1000:.0f} ms"
                print(f"  end to end, {count} reference(s): {times} ({added}); {encoding}")
            result["end_to_end"] = rows
        httpd.shutdown()
    if args.json:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
