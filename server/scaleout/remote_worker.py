"""A worker slot over the Ray Serve GPU deployment, behind the supervisor's `Worker` seam: each job is a
stream to one replica (by its LoRA set's id, Ray Serve's multiplexed model id, to a free replica that
holds the set; otherwise to any free one), and the replica's messages reach the listener on the event
loop as a spawned child's would.

A replica lost with the job in hand (its process killed, its node gone) costs the job one more try on
another replica, never two answers: only a stream that ended without an outcome is tried again. A second
loss fails the request as `runner_disconnected`; the slot stays ready, since Ray Serve replaces replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import OrderedDict, defaultdict
from typing import Any, cast

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pipeline.messages import (
    FailureKind,
    FromWorker,
    Job,
    JobFailed,
    JobNote,
    JobStarted,
    JobSucceeded,
    WorkerStartupFailed,
)
from server.worker_process import Listener, WorkerExited

log = logging.getLogger(__name__)

_LOST = (RayActorError, ActorUnavailableError)


class LoraPlacement:
    """Which LoRA sets each replica ran last (as many as Ray Serve routes it as holding,
    `FLUX2_RAY_LORA_SETS_PER_WORKER`) and which replicas have a job, as the dispatcher's slots saw them: a
    slot that frees up takes a waiting job whose LoRAs a free replica holds, and the job's set id takes it
    there. A job sent that way counts its replica busy at once, before the replica says it started, so
    the next slot does not count on the same replica."""

    def __init__(self, per_replica: int) -> None:
        self._per_replica = per_replica
        self._held: defaultdict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        self._busy: set[str] = set()

    def _free_holder(self, lora_set: str) -> str | None:
        return next(
            (
                replica
                for replica, held in self._held.items()
                if lora_set in held and replica not in self._busy
            ),
            None,
        )

    def free_replica_holds(self, lora_set: str) -> bool:
        return self._free_holder(lora_set) is not None

    def reserve(self, lora_set: str) -> str:
        """The free replica the job is expected on (now busy), or "" when none holds its set."""
        replica = self._free_holder(lora_set) or ""
        if replica:
            self._busy.add(replica)
        return replica

    def started(self, replica: str, lora_set: str, reserved: str) -> None:
        """The job started on `replica` (Ray may have sent it elsewhere than to the one reserved)."""
        self._busy.discard(reserved)
        self._busy.add(replica)
        held = self._held[replica]
        held[lora_set] = None
        held.move_to_end(lora_set)
        while len(held) > self._per_replica:
            held.popitem(last=False)

    def finished(self, replica: str) -> None:
        self._busy.discard(replica)


class RemoteWorker:
    def __init__(
        self, deployment: DeploymentHandle[Any], listener: Listener, placement: LoraPlacement | None = None
    ) -> None:
        self._deployment = deployment
        self._placement = placement  # None: Ray Serve's default routing (to compare), not by LoRA set
        self._listener = listener
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stream: DeploymentResponseGenerator[Any] | None = None
        self._job: Job | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._ready(), context=contextvars.Context())

    async def _ready(self) -> None:
        try:
            ready = await self._deployment.ready.remote()
        except Exception as exc:  # the deployment is gone or cannot start a replica
            self._listener(WorkerStartupFailed(f"no GPU worker replica answered: {exc}"))
            return
        self._listener(ready)

    def submit(self, job: Job) -> None:
        assert self._loop is not None, "not started"
        self._job = job
        # In a context of its own: created while the dispatcher answers some client's request, the task
        # would otherwise carry that request's Ray Serve context, and each job's call to the deployment
        # would go out as a child of it (its request id shared between jobs, its cancel cancelling them).
        self._task = self._loop.create_task(self._run(job), context=contextvars.Context())

    def prefers(self, job: Job) -> bool:
        """Whether a free replica holds the job's LoRAs: sent with their set's id, it goes there."""
        return self._placement is not None and self._placement.free_replica_holds(job.lora_set)

    async def _run(self, job: Job) -> None:
        placement = self._placement
        where = placement.reserve(job.lora_set) if placement is not None else ""  # the replica it is on

        def tell(message: FromWorker) -> None:
            nonlocal where
            if self._job is not job:  # let go of (`kill`)
                return
            if placement is not None and isinstance(message, JobStarted):
                placement.started(message.worker, job.lora_set, where)
                where = message.worker
            self._listener(message)

        lost = ""
        for attempt in (1, 2):
            # By its set's id to the free replica holding it; otherwise plainly, to any free replica. An
            # id no free replica holds would wait in Ray's router behind newer jobs that match: starved.
            model_id = job.lora_set if where and attempt == 1 else ""
            stream = self._deployment.options(stream=True, multiplexed_model_id=model_id)
            responses = cast(DeploymentResponseGenerator[Any], stream.run.remote(job))
            self._stream = responses
            outcome: JobSucceeded | JobFailed | None = None
            try:
                async for message in responses:
                    if isinstance(message, JobSucceeded | JobFailed):
                        # Told when the stream has ended: the replica is free then, for Ray too.
                        outcome = message
                    else:
                        tell(message)
                if outcome is None:
                    detail = "the GPU worker replica ended the job without an answer"
                    outcome = JobFailed(job.request_id, FailureKind.INTERNAL, detail)
            except RequestCancelledError:
                outcome = outcome or JobFailed(job.request_id, FailureKind.CANCELLED, "Request was cancelled")
            except _LOST as exc:
                if outcome is None:  # lost before its outcome: tried again (after it, only figures were lost)
                    lost = f"{type(exc).__name__}: {exc}"
                    log.error("a GPU worker replica was lost (try %d of 2): %s", attempt, lost)
                    if attempt == 1:
                        note = "the GPU worker replica running it was lost; running it again on another"
                        tell(JobNote(job.request_id, note))
            except Exception as exc:  # anything else from Ray: this request fails, and only it
                log.exception("the GPU worker deployment failed a request")
                detail = f"the GPU worker deployment failed: {type(exc).__name__}: {exc}"
                outcome = outcome or JobFailed(job.request_id, FailureKind.INTERNAL, detail)
            finally:
                self._stream = None
                if placement is not None:
                    placement.finished(where)
            if outcome is not None:
                tell(outcome)
                return
        detail = f"the GPU worker replica running it was lost twice ({lost.splitlines()[0]})"
        tell(JobFailed(job.request_id, FailureKind.WORKER_LOST, detail))

    def cancel(self, request_id: str) -> None:
        """Cancel the stream: the replica stops the job at its next denoising step."""
        if self._stream is not None and self._job is not None and self._job.request_id == request_id:
            self._stream.cancel()

    def kill(self) -> None:
        """Let go of a job that hangs (the watchdog's call): its stream is cancelled, and the replica's own
        health check has Ray Serve replace it. The slot starts again, as after a worker's exit."""
        self._job = None
        if self._stream is not None:
            self._stream.cancel()
        if self._loop is not None:
            self._loop.call_soon(self._listener, WorkerExited(None))

    def stop(self, timeout: float = 10.0) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._task.cancel()
