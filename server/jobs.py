"""Requests as the queue sees them: a record per request id, its status, logs and outcome."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from pipeline.messages import GenerationParams, Job
from server.fetch.lora_fetcher import LocalLora, LoraRequest, resolved
from server.outcome import Outcome


class JobStatus(StrEnum):
    """fal's three queue states; no other status string exists on the wire."""

    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


_ALLOWED = {
    JobStatus.IN_QUEUE: {JobStatus.IN_PROGRESS, JobStatus.COMPLETED},
    JobStatus.IN_PROGRESS: {JobStatus.COMPLETED},
    JobStatus.COMPLETED: set(),
}


class IllegalTransition(RuntimeError):
    pass


class Priority(int, Enum):
    NORMAL = 0
    LOW = 1


@dataclass
class LogEntry:
    message: str
    level: str = "INFO"
    source: str = "user"
    timestamp: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "message": self.message,
            "level": self.level,
            "source": self.source,
            "timestamp": self.timestamp,
        }


@dataclass
class JobRecord:
    request_id: str
    app_id: str  # the full fal app id the request was sent to, e.g. "fal-ai/flux-2/lora"
    request_input: dict[str, Any]
    base_url: str  # this server's URL as the client reached it, for absolute file URLs
    params: GenerationParams | None = None  # None when the input failed validation
    loras: tuple[LoraRequest, ...] = ()  # as requested; fetched before the request is queued
    image_urls: tuple[str, ...] = ()  # an edit's reference images as requested; fetched likewise
    sync_mode: bool = False
    priority: Priority = Priority.NORMAL
    status: JobStatus = JobStatus.IN_QUEUE
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    inference_seconds: float | None = None
    logs: list[LogEntry] = field(default_factory=list)
    outcome: Outcome | None = None
    fetched_loras: list[LocalLora] = field(default_factory=list)  # `loras` on disk, pinned until done
    fetched_images: list[Path] = field(default_factory=list)  # `image_urls` decoded, kept until done
    start_timeout: float | None = None  # X-Fal-Request-Timeout: seconds it may wait before starting
    timed_out: bool = False  # stopped for running past the run timeout
    webhook_url: str | None = None  # `?fal_webhook=`: told the outcome when the request completes
    webhook_pending: bool = False  # completed, and its webhook neither delivered nor given up on yet
    owner: str | None = None  # digest of the API key that submitted it (None when keys are off)
    durable: bool = False  # kept in the job store (queue requests); sync runs live and die with their caller
    passed_over: int = 0  # times a request behind it started first (a worker holding its LoRAs took it)
    version: int = 0  # bumped on every change, so watchers can tell what they have seen
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def move_to(self, status: JobStatus) -> None:
        if status not in _ALLOWED[self.status]:
            raise IllegalTransition(f"request {self.request_id}: {self.status.value} -> {status.value}")
        self.status = status
        now = time.time()
        if status is JobStatus.IN_PROGRESS:
            self.started_at = now
        elif status is JobStatus.COMPLETED:
            self.finished_at = now
            self.webhook_pending = self.webhook_url is not None  # stored with the outcome: a restart resends
        self.touch()

    def complete(self, outcome: Outcome, inference_seconds: float | None = None) -> None:
        self.outcome = outcome
        self.inference_seconds = inference_seconds
        self.move_to(JobStatus.COMPLETED)

    def log(self, message: str, level: str = "INFO") -> None:
        stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        self.logs.append(LogEntry(message, level, timestamp=stamp))
        self.touch()

    def touch(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, seen_version: int, timeout: float) -> bool:
        """Wait until the record is newer than `seen_version`; False on timeout."""
        if self.version != seen_version:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def job(self) -> Job:
        """What the worker runs: the request with its LoRAs and reference images as the fetch stage left
        them."""
        assert self.params is not None, "an invalid request never runs"
        loras = resolved(self.loras, self.fetched_loras)
        return Job(self.request_id, self.params, loras, tuple(str(path) for path in self.fetched_images))

    @property
    def done(self) -> bool:
        return self.status is JobStatus.COMPLETED
