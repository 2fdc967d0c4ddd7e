"""`flux2-server generate`, `download` and `lora-info`: local, one-shot use of the same code the server
runs.

`generate` validates its arguments with the server's own input schema, fetches LoRAs and reference
images through the same fetchers (a local reference file goes in as a `data:` URI, so it passes the same
checks), and runs the same `ImageGenerator`, so a CLI image equals the server's for the same request.
torch is imported only inside these functions.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import sys
import tempfile
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
from server.fetch.reference_images import ReferenceFetcher, ReferenceImageError
from server.files import FileStore
from server.schemas import Flux2LoraEditInput, Flux2LoraInput
from server.store.database import Database, sqlite_url


def parse_lora(text: str) -> dict[str, Any]:
    """`PATH[:SCALE]`; a URL's own colons stay in the path (only a number after the last colon is a scale)."""
    path, _, scale = text.rpartition(":")
    try:
        return {"path": path, "scale": float(scale)} if path else {"path": text}
    except ValueError:
        return {"path": text}


def reference_url(text: str) -> str:
    """An `--image`: a URL (http, https, data) as given; a local file as a data: URI of its bytes."""
    if text.partition(":")[0].lower() in ("http", "https", "data"):
        return text
    path = Path(text).expanduser()
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def generate(settings: Settings, registry: Registry, body: dict[str, Any], output: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="flux2-references-") as folder:
        return _generate(settings, registry, body, output, Path(folder))


def _generate(
    settings: Settings, registry: Registry, body: dict[str, Any], output: Path, folder: Path
) -> int:
    from tqdm import tqdm

    from pipeline.worker import load_generator, run_job

    schema = Flux2LoraEditInput if body.get("image_urls") else Flux2LoraInput
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        for error in validation_errors(exc):
            print(f"flux2-server: {'.'.join(map(str, error['loc'][1:]))}: {error['msg']}", file=sys.stderr)
        return 2
    params, requested = request.to_params(), request.lora_requests()
    try:
        fetched, references = asyncio.run(
            _fetch([lora.path for lora in requested], request.reference_urls(), settings, folder)
        )
    except LoraSourceError as exc:
        print(f"flux2-server: {exc.message}", file=sys.stderr)
        return 2
    except ReferenceImageError as exc:
        print(f"flux2-server: --image {exc.message}", file=sys.stderr)
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
        job = Job("cli", params, loras, tuple(str(path) for path in references))
        result = run_job(generator, job, lambda step, total: bar.update(step - bar.n), lambda: False)
    if isinstance(result, JobFailed):
        print(f"flux2-server: {result.message}", file=sys.stderr)
        return 2
    outputs = _output_paths(output, len(result.images))
    for path, image in zip(outputs, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
        print(path)
    return 0


async def _fetch(
    paths: list[str], references: tuple[str, ...], settings: Settings, folder: Path | None = None
) -> tuple[list[LocalLora], list[Path]]:
    """The LoRAs into the server's cache; the references decoded into `folder`, as the server would."""
    fetcher = LoraFetcher(settings.lora_policy())
    try:
        loras = await fetcher.fetch_all(paths) if paths else []
        if not references:
            return loras, []
        assert folder is not None, "references need a folder"
        database = Database(sqlite_url(folder / "files.sqlite"))
        try:
            database.migrate()
            store = FileStore(folder, database)
            images = ReferenceFetcher(settings.reference_policy(), fetcher.downloads, store)
            return loras, await images.fetch_all(references, None, ())
        finally:
            database.close()
    finally:
        await fetcher.aclose()


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def lora_info(settings: Settings, path: str) -> int:
    """Fetch the LoRA as a request's would be (file, URL, Hub repo), then report it as the worker reads
    it; exit status 1 when the server would refuse it."""
    from pipeline.worker import lora_report

    local = Path(path).expanduser()
    if not local.is_file():
        try:
            fetched, _ = asyncio.run(_fetch([path], (), settings))
        except LoraSourceError as exc:
            print(f"flux2-server: {exc.message}", file=sys.stderr)
            return 1
        local = fetched[0].file
    text, taken = lora_report(local, settings.max_lora_rank, settings.lycoris_truncate)
    print(text)
    return 0 if taken else 1


def download(settings: Settings, registry: Registry, model_name: str) -> int:
    """Fetch (or resume fetching) a model's weights into the Hugging Face cache; build the tiny one."""
    from pipeline.worker import DownloadError, download_model

    try:
        print(download_model(registry.get(model_name), settings.cache_dir))
    except DownloadError as exc:
        print(f"flux2-server: {exc}", file=sys.stderr)
        return 1
    return 0
