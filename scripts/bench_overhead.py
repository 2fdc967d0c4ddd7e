"""What the server adds on top of the pipeline, per request, measured side by side in one run.

The same tiny-model request runs N times directly through Flux2Pipeline (in this process) and N times
through a live server with the real fal_client, interleaved so both see the same machine state. Prints the
median end-to-end time of each path, the median overhead in ms, and the ratio.

    .venv/bin/python scripts/bench_overhead.py [-n 30] [--size square] [--steps 4] [--format png]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fal_client
import fal_client.client
import torch

from pipeline.generation import pipeline_kwargs
from pipeline.images import encode_image
from pipeline.testing import load_tiny
from server.config import Settings
from server.schemas import Flux2LoraInput
from server.testing import LiveServer

APP = "fal-ai/flux-2/lora"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=30, help="requests per path")
    parser.add_argument("--size", default="square", help="an image_size preset")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="output_format")
    args = parser.parse_args()

    cache_dir = Settings.load().cache_dir
    pipe = load_tiny(cache_dir)

    def request(i: int) -> dict[str, object]:
        # A new prompt every round: the server's prompt-embedding cache would otherwise skip the text
        # encoder and make the server look faster than the pipeline it wraps.
        prompt = f"a lighthouse at dusk, take {i}"
        return {"prompt": prompt, "image_size": args.size, "num_inference_steps": args.steps, "seed": 1,
                "output_format": args.format}  # fmt: skip

    def direct(i: int) -> None:
        with torch.inference_mode():
            pipe(**pipeline_kwargs(Flux2LoraInput.model_validate(request(i)).to_params()))

    def direct_encoded(i: int) -> None:
        params = Flux2LoraInput.model_validate(request(i)).to_params()
        with torch.inference_mode():
            image = pipe(**pipeline_kwargs(params)).images[0]
        encode_image(image, params.output_format)

    with tempfile.TemporaryDirectory() as data_dir:
        server = LiveServer(Path(data_dir), "--model", "tiny", env={"FLUX2_CACHE_DIR": str(cache_dir)})
        try:
            server.wait_ready()
            fal_client.client.RUN_URL_FORMAT = f"{server.url}/"
            fal_client.client.QUEUE_URL_FORMAT = f"{server.url}/queue/"
            client = fal_client.SyncClient(key="bench")
            paths: dict[str, Callable[[int], object]] = {
                "pipeline call": direct,
                "pipeline call + encode": direct_encoded,
                "server, fal_client.run": lambda i: client.run(APP, request(i)),
                "server, fal_client.subscribe": lambda i: client.subscribe(
                    APP, request(i), client_timeout=60
                ),
            }
            for call in paths.values():  # warm-up: first calls allocate and fill caches
                call(-1)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for i in range(args.n):
                for name, call in paths.items():
                    started = time.perf_counter()
                    call(i)
                    times[name].append(time.perf_counter() - started)
        finally:
            server.stop()

    bare = statistics.median(times["pipeline call"])
    encoded = statistics.median(times["pipeline call + encode"])
    threads = torch.get_num_threads()
    print(f"{args.n} requests a path: {args.size} {args.format}, {args.steps} steps, tiny, {threads} threads")
    print(f"{'path':30} {'median ms':>10} {'over call ms':>13} {'ratio':>6} {'over call+encode ms':>20}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:30} {median * 1e3:10.1f} {(median - bare) * 1e3:13.1f} {median / bare:6.3f} "
              f"{(median - encoded) * 1e3:20.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
