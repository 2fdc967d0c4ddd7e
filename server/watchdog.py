"""The watchdog: tells the supervisor when the worker is hung rather than slow.

A worker can die (the supervisor sees the process exit) or hang: a stuck kernel, a driver fault, a
deadlock, a process stopped by the operating system. A hung worker never reaches the next step, so a
cooperative cancel cannot stop it. Three signs are watched, on a tick:

- the job in hand ran past the run timeout: first a cooperative cancel is asked for (`overran`), and if
  the job has not ended `cancel_grace` seconds later, the worker is hung;
- the worker said nothing (no step, no result) for `heartbeat` seconds while running a job;
- the model load took longer than `startup` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Hang(StrEnum):
    RUN_TIMEOUT = "run_timeout"  # past the run timeout and the grace for the cooperative cancel
    SILENT = "silent"  # nothing heard for a heartbeat interval while running
    STARTUP = "startup"  # the model load outlasted its deadline


@dataclass(frozen=True)
class WatchdogLimits:
    run_timeout: float | None = None  # seconds a job may run before it is asked to stop
    cancel_grace: float = 30.0  # seconds it then has to stop, before the worker is killed
    heartbeat: float | None = None  # seconds of silence while running after which the worker is hung
    startup: float | None = None  # seconds a model load may take

    @property
    def tick(self) -> float:
        """How often the deadlines are looked at: a fraction of the shortest, at most a second."""
        limits = [x for x in (self.run_timeout, self.cancel_grace, self.heartbeat, self.startup) if x]
        return max(0.02, min([1.0, *(limit / 5 for limit in limits)]))


class Watchdog:
    def __init__(
        self, limits: WatchdogLimits, overran: Callable[[], None], hung: Callable[[Hang], None]
    ) -> None:
        self.limits = limits
        self._overran = overran
        self._hung = hung
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._loading_since: float | None = None
        self._running_since: float | None = None
        self._heard: float = 0.0
        self._asked_to_stop = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._watch(), name="worker watchdog")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._loading_since = self._running_since = None

    # What the supervisor tells it:

    def loading(self) -> None:
        self._loading_since, self._running_since = self._now(), None

    def running(self) -> None:
        self._loading_since = None
        self._running_since = self._heard = self._now()
        self._asked_to_stop = False

    def heard(self) -> None:
        self._heard = self._now()

    def idle(self) -> None:
        self._loading_since = self._running_since = None

    def _now(self) -> float:
        assert self._loop is not None, "the watchdog is not started"
        return self._loop.time()

    async def _watch(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.limits.tick)
                self._check()

    def _check(self) -> None:
        now, limits = self._now(), self.limits
        if self._loading_since is not None:
            if limits.startup is not None and now - self._loading_since > limits.startup:
                self._loading_since = None
                self._hung(Hang.STARTUP)
            return
        if self._running_since is None:
            return
        elapsed = now - self._running_since
        if limits.run_timeout is not None and elapsed > limits.run_timeout:
            if not self._asked_to_stop:
                self._asked_to_stop = True
                self._overran()
            elif elapsed > limits.run_timeout + limits.cancel_grace:
                self._running_since = None
                self._hung(Hang.RUN_TIMEOUT)
                return
        if limits.heartbeat is not None and now - self._heard > limits.heartbeat:
            self._running_since = None
            self._hung(Hang.SILENT)
