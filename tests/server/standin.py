"""A stand-in worker behind the typed worker interface, so HTTP-side tests run in milliseconds.

It speaks the same messages as `pipeline.worker`; only the image is a fixed tiny PNG. Everything that
touches the real pipeline is tested end to end against the tiny FLUX.2 model instead.
"""

from __future__ import annotations

import asyncio
import io

from PIL import Image

from pipeline.messages import (
    EncodedImage,
    FailureKind,
    Job,
    JobFailed,
    JobStarted,
    JobSucceeded,
    StepProgress,
    WorkerReady,
    WorkerStats,
)
from server.worker_process import Listener


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


class StandInWorker:
    def __init__(self, listener: Listener, hold: bool = False) -> None:
        self.listener = listener
        self.hold = hold  # keep each job running until release() or a cancel
        self.submitted: list[Job] = []
        self._running: Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.call_soon(self.listener, WorkerReady("stand-in", "cpu", "float32", 0.0))

    def submit(self, job: Job) -> None:
        assert self._loop is not None
        self.submitted.append(job)
        self._running = job
        self._loop.call_soon(self.listener, JobStarted(job.request_id))
        self._loop.call_soon(self.listener, StepProgress(job.request_id, 1, job.params.num_inference_steps))
        if not self.hold:
            self._loop.call_soon(self.release)

    def release(self) -> None:
        job, self._running = self._running, None
        if job is None:
            return
        p = job.params
        image = EncodedImage(png(p.width, p.height), "image/png", p.width, p.height)
        self.listener(
            JobSucceeded(
                job.request_id, (image,) * p.num_images, p.seed, p.prompt, (False,) * p.num_images, 0.01
            )
        )
        self.listener(WorkerStats(0.002, 1, 2, 0, 0, 0, 0))

    def cancel(self, request_id: str) -> None:
        assert self._loop is not None
        if self._running is not None and self._running.request_id == request_id:
            self._running = None
            self._loop.call_soon(
                self.listener, JobFailed(request_id, FailureKind.CANCELLED, "Request was cancelled")
            )

    def stop(self, timeout: float = 10.0) -> None:
        self._running = None
