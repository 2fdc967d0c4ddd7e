"""fal's output JSON for a finished generation: files stored and linked, or inlined with `sync_mode`."""

from __future__ import annotations

import base64

from pipeline.messages import EncodedImage, JobSucceeded
from server.files import FileStore
from server.jobs import JobRecord
from server.outcome import Outcome
from server.schemas import File, Flux2Output, Timings


class OutputBuilder:
    def __init__(self, files: FileStore) -> None:
        self.files = files

    async def build(self, record: JobRecord, result: JobSucceeded) -> Outcome:
        output = Flux2Output(
            images=[await self._file(record, image, i) for i, image in enumerate(result.images)],
            timings=Timings(inference=result.inference_seconds),
            seed=result.seed,
            has_nsfw_concepts=list(result.has_nsfw_concepts),
            prompt=result.prompt,
        )
        return Outcome(200, output.model_dump())

    async def _file(self, record: JobRecord, image: EncodedImage, index: int) -> File:
        extension = image.content_type.split("/")[1]
        if record.sync_mode:  # inline, and nothing kept on disk
            url = f"data:{image.content_type};base64,{base64.b64encode(image.data).decode()}"
            file_name = f"{record.request_id}-{index}.{extension}"
        else:
            file_name = await self.files.save(image.data, image.content_type, record.owner)
            url = self.files.url(record.base_url, file_name)
        return File(
            url=url,
            content_type=image.content_type,
            file_name=file_name,
            file_size=len(image.data),
            width=image.width,
            height=image.height,
        )
