"""`flux2-server generate` and `download`: local, one-shot use of the same code the server runs.

`generate` validates its arguments with the server's own input schema, fetches LoRAs through the same
fetcher and cache, and runs the same `ImageGenerator`, so a CLI image equals the server's for the same
request. torch is imported only inside these functions.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.messages import Job, JobFailed
from pipeline.models import Registry
from server.config import Settings
from server.errors import validation_errors
from server.fetch.errors import LoraSourceError
from server.fetch.lora_fetcher import LocalLora, LoraFetcher, resolved
from server.schemas import Flux2LoraInput


def parse_lora(text: str) -> dict[str, Any]:
    """`PATH[:SCALE]`; a URL's own colons stay in the path (only a number after the last colon is a scale)."""
    path, _, scale = text.rpartition(":")
    try:
        return {"path": path, "scale": float(scale)} if path else {"path": text}
    except ValueError:
        return {"path": text}


def generate(settings: Settings, registry: Registry, body: dict[str, Any], output: Path) -> int:
    from tqdm import tqdm

    from pipeline.worker import load_generator, run_job

    try:
        request = Flux2LoraInput.model_validate(body)
    except ValidationError as exc:
        for error in validation_errors(exc):
            print(f"flux2-server: {'.'.join(map(str, error['loc'][1:]))}: {error['msg']}", file=sys.stderr)
        return 2
    params, requested = request.to_params(), request.lora_requests()
    try:
        fetched = asyncio.run(_fetch([lora.path for lora in requested], settings)) if requested else []
    except LoraSourceError as exc:
        print(f"flux2-server: {exc.message}", file=sys.stderr)
        return 2
    loras = resolved(requested, fetched)
    # One image: compile only when its preset runs compiled, and warm nothing up front (it would compile
    # the same graphs as the image itself).
    config = replace(settings.worker_config(registry), warmup_sizes=())
    if params.acceleration == "none":
        config = replace(config, compile=False)
    generator, ready = load_generator(config)
    print(f"model {ready.model} on {ready.device}, seed {params.seed}", file=sys.stderr)
    with tqdm(total=params.num_inference_steps, unit="step", desc="generating") as bar:
        result = run_job(
            generator, Job("cli", params, loras), lambda step, total: bar.update(step - bar.n), lambda: False
        )
    if isinstance(result, JobFailed):
        print(f"flux2-server: {result.message}", file=sys.stderr)
        return 2
    outputs = _output_paths(output, len(result.images))
    for path, image in zip(outputs, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
        print(path)
    return 0


async def _fetch(paths: list[str], settings: Settings) -> list[LocalLora]:
    fetcher = LoraFetcher(settings.lora_policy())
    try:
        return await fetcher.fetch_all(paths)
    finally:
        await fetcher.aclose()


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def download(settings: Settings, registry: Registry, model_name: str) -> int:
    """Fetch (or resume fetching) a model's weights into the Hugging Face cache; build the tiny one."""
    from pipeline.worker import DownloadError, download_model

    try:
        print(download_model(registry.get(model_name), settings.cache_dir))
    except DownloadError as exc:
        print(f"flux2-server: {exc}", file=sys.stderr)
        return 1
    return 0
