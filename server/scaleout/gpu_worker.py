"""A GPU worker replica of the Ray Serve deployment: the worker's own entry points (load once, then one
job at a time), in the replica's process instead of a spawned child.

Ray Serve routes each job by its LoRA set (model multiplexing): `hold_lora_set` tells the router which sets
this replica holds, so a job goes where its LoRAs are already parsed in memory (and on the device) when
such a replica is free. The LoRAs themselves are read by the job, from the files the dispatcher fetched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ray import serve

from pipeline.logs import configure_logging
from pipeline.messages import FromWorker, Job, JobFailed, JobSucceeded, WorkerConfig, WorkerReady
from pipeline.worker import load_generator, serve_job

log = logging.getLogger(__name__)


class GpuWorker:
    def __init__(self, config: WorkerConfig, lora_sets: int, heartbeat_seconds: float) -> None:
        configure_logging(config.log_level, config.log_json)
        self._generator, self._ready = load_generator(config)
        replica = serve.get_replica_context().replica_id.unique_id
        self.name = f"replica {replica} (pid {os.getpid()})"
        self._heartbeat = heartbeat_seconds
        self._gpu = threading.Lock()  # one job at a time, even while a cancelled one reaches its next step
        self._heard: float | None = None  # when the running job last reported, for the health check

        async def hold(lora_set: str) -> str:
            return lora_set  # the parsed LoRAs are kept by the generator's caches; this marks the routing

        self.hold_lora_set: Callable[[str], Awaitable[str]] = serve.multiplexed(
            max_num_models_per_replica=lora_sets
        )(hold)
        log.warning("%s ready: %r on %s", self.name, self._ready.model, self._ready.device)

    def ready(self) -> WorkerReady:
        return self._ready

    async def run(self, job: Job) -> AsyncIterator[FromWorker]:
        """Run one job, streaming its messages; a cancelled stream stops it at its next step."""
        await self.hold_lora_set(job.lora_set)  # this replica holds its LoRAs now: route that set here
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[FromWorker] = asyncio.Queue()
        stop = threading.Event()

        def send(message: FromWorker) -> None:
            self._heard = time.monotonic()
            loop.call_soon_threadsafe(messages.put_nowait, message)

        def work() -> None:
            with self._gpu:
                try:
                    serve_job(self._generator, job, send, stop.is_set, self.name)
                finally:
                    self._heard = None

        running = loop.run_in_executor(None, work)
        try:
            while not isinstance(message := await messages.get(), JobSucceeded | JobFailed):
                yield message
            await running
            while not messages.empty():  # the worker's figures after the job
                yield messages.get_nowait()
            # The outcome last: the dispatcher hands out the next job when it arrives, and this replica is
            # free for it only once the stream has ended.
            yield message
        finally:
            stop.set()

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: a job silent past the heartbeat is hung."""
        heard = self._heard
        if heard is not None and time.monotonic() - heard > self._heartbeat:
            raise RuntimeError(f"{self.name}: the running job sent nothing for {self._heartbeat:g} s (hung)")
