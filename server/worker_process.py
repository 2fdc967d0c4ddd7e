"""The HTTP side's handle on the GPU worker: a spawned child process and the queues to it.

A spawned (not forked) child owns CUDA alone, so a crash or CUDA error there never takes the HTTP side
down, and `/health` keeps answering while the worker loads or dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from typing import Any

from pipeline.messages import FromWorker, Job, Shutdown, WorkerConfig
from pipeline.worker import run_worker

log = logging.getLogger(__name__)

_REQUEST_ID_BYTES = 64


class WorkerExited:
    """Posted to the listener when the child process is gone without being asked to stop."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode


Listener = Callable[[FromWorker | WorkerExited], None]


class WorkerProcess:
    def __init__(self, config: WorkerConfig, listener: Listener) -> None:
        self._config = config
        self._listener = listener
        self._ctx = multiprocessing.get_context("spawn")
        self._process: SpawnProcess | None = None
        self._stopping = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Spawn the child; its messages are delivered to the listener on `loop`'s thread."""
        self._stopping = False
        self._inbox: Any = self._ctx.Queue()
        self._outbox: Any = self._ctx.Queue()
        self._cancelled_id: Any = self._ctx.Array("c", _REQUEST_ID_BYTES)
        self._process = self._ctx.Process(
            target=run_worker,
            args=(self._config, self._inbox, self._outbox, self._cancelled_id),
            name="flux2-worker",
            daemon=True,
        )
        self._process.start()
        self._pump_thread = threading.Thread(
            target=self._pump, args=(loop, self._process, self._outbox), daemon=True
        )
        self._pump_thread.start()

    def _pump(self, loop: asyncio.AbstractEventLoop, process: SpawnProcess, outbox: Any) -> None:
        """Forward the child's messages to the event loop until the child is gone."""
        while True:
            try:
                message = outbox.get(timeout=0.5)
            except queue.Empty:
                if process.is_alive():
                    continue
                if not self._stopping:
                    loop.call_soon_threadsafe(self._listener, WorkerExited(process.exitcode))
                return
            except (EOFError, OSError):
                return
            loop.call_soon_threadsafe(self._listener, message)

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def prefers(self, job: Job) -> bool:
        return False  # the only worker: every job is as good as another

    def cancel(self, request_id: str) -> None:
        """Ask the running job to stop at its next denoising step."""
        self._cancelled_id.value = request_id.encode()[:_REQUEST_ID_BYTES]

    def kill(self) -> None:
        """Stop the child at once, with every process it started (torch.compile's workers), without
        asking: a hung worker never reads its inbox. The pump then reports the exit."""
        process = self._process
        if process is None or process.pid is None:
            return
        try:
            if os.getpgid(process.pid) == process.pid:  # its own process group (see run_worker)
                os.killpg(process.pid, signal.SIGKILL)
                return
        except ProcessLookupError:
            return  # already gone
        process.kill()

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        self._stopping = True
        if self._process.is_alive():
            self._inbox.put(Shutdown())
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        self._process = None
        self._pump_thread.join(timeout)
        # Drop the queues and the shared slot now: their semaphores are unlinked when collected, and the
        # multiprocessing resource tracker warns about any still alive when the server exits.
        for channel in (self._inbox, self._outbox):
            channel.close()
            channel.join_thread()
        del self._inbox, self._outbox, self._cancelled_id
