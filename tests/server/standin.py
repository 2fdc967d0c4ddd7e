"""A stand-in worker behind the typed worker interface, so HTTP-side tests run in milliseconds.

It speaks the same messages as `pipeline.worker`; only the image is a fixed tiny PNG. Everything that
touches the real pipeline is tested end to end against the tiny FLUX.2 model instead.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

from anyio.from_thread import BlockingPortal
from PIL import Image

from pipeline.messages import (
    EncodedImage,
    FailureKind,
    FromWorker,
    Job,
    JobFailed,
    JobStarted,
    JobSucceeded,
    StepProgress,
    WorkerReady,
    WorkerStats,
)
from server.worker_process import Listener, WorkerExited


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


class StandInWorker:
    def __init__(
        self, listener: Listener, hold: bool = False, hang: bool = False, loads: bool = True
    ) -> None:
        self.listener = listener
        self.hold = hold  # keep each job running until release() or a cancel
        self.hang = hang  # like a hung process: no cancel is ever obeyed
        self.loads = loads  # False: the model load never ends
        self.kills = 0
        self.submitted: list[Job] = []
        self.portal: BlockingPortal | None = None  # the test client's way onto the server's event loop
        self.settle: Callable[[], Awaitable[None]] | None = None  # waits for the server's work in flight
        self._running: Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the Worker interface, called by the server on its event loop -----------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.loads:
            loop.call_soon(self.listener, WorkerReady("stand-in", "cpu", "float32", 0.0))

    def submit(self, job: Job) -> None:
        assert self._loop is not None
        self.submitted.append(job)
        self._running = job
        self._loop.call_soon(self.listener, JobStarted(job.request_id))
        self._loop.call_soon(self.listener, StepProgress(job.request_id, 1, job.params.num_inference_steps))
        if not self.hold:
            self._loop.call_soon(self._finish)

    def prefers(self, job: Job) -> bool:
        return False

    def cancel(self, request_id: str) -> None:
        assert self._loop is not None
        if not self.hang and self._running is not None and self._running.request_id == request_id:
            self._running = None
            self._loop.call_soon(
                self.listener, JobFailed(request_id, FailureKind.CANCELLED, "Request was cancelled")
            )

    def kill(self) -> None:
        assert self._loop is not None
        self.kills += 1
        self._running = None
        self._loop.call_soon(self.listener, WorkerExited(-9))

    def stop(self, timeout: float = 10.0) -> None:
        self._running = None

    # --- driven by the test, from its own thread ---------------------------------------------------------

    def release(self) -> None:
        """Finish the running job; returns once the server has recorded its outcome."""
        assert self.portal is not None
        self.portal.call(self._release)

    def send(self, message: FromWorker | WorkerExited) -> None:
        """Say what a worker would say; returns once the server has settled what it set off."""
        assert self.portal is not None
        self.portal.call(self._send, message)

    async def _release(self) -> None:
        self._finish()
        await self._settled()

    async def _send(self, message: FromWorker | WorkerExited) -> None:
        self.listener(message)
        await self._settled()

    async def _settled(self) -> None:
        if self.settle is not None:
            await self.settle()

    def _finish(self) -> None:
        job, self._running = self._running, None
        if job is None:
            return
        p = job.params
        width, height = p.width, p.height
        if width is None or height is None:  # an edit's output takes its first reference's size
            with Image.open(job.images[0]) as first:
                width, height = first.width // 16 * 16, first.height // 16 * 16
        image = EncodedImage(png(width, height), "image/png", width, height)
        self.listener(
            JobSucceeded(
                job.request_id, (image,) * p.num_images, p.seed, p.prompt, (False,) * p.num_images, 0.01
            )
        )
        self.listener(WorkerStats(0.002, 1, 2, 0, 0, 0, 0))
