"""Accepted requests waiting for the worker: normal priority before low, first come first served within
each, except that a worker better placed for a request a few places further down (it holds its LoRAs)
may take that one first; the request at the head is passed over a bounded number of times. A request
stays withdrawable until the moment it leaves for the worker."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from server.jobs import JobRecord, Priority

LOOK_AHEAD = 8  # how far down its line a worker may reach, and how often the head may be passed over


class RequestQueue:
    def __init__(self) -> None:
        self._lines: dict[Priority, deque[JobRecord]] = {priority: deque() for priority in Priority}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def push(self, record: JobRecord) -> None:
        self._lines[record.priority].append(record)

    def pop(self, prefer: Callable[[JobRecord], bool] | None = None) -> JobRecord | None:
        """The next request to run, taken out of the queue; None when nothing waits. With `prefer`, the
        first of the next `LOOK_AHEAD` in the first waiting line that it prefers, unless the head has
        been passed over that many times already."""
        for priority in Priority:
            line = self._lines[priority]
            if not line:
                continue
            if prefer is not None and line[0].passed_over < LOOK_AHEAD and not prefer(line[0]):
                for place, record in enumerate(itertools.islice(line, 1, LOOK_AHEAD), start=1):
                    if prefer(record):
                        for ahead in itertools.islice(line, place):
                            ahead.passed_over += 1
                        del line[place]
                        return record
            return line.popleft()
        return None

    def remove(self, record: JobRecord) -> bool:
        """Take a waiting request out; False if it was not queued."""
        try:
            self._lines[record.priority].remove(record)
        except ValueError:
            return False
        return True

    def position(self, record: JobRecord) -> int | None:
        """How many requests run before it, or None when it is not queued."""
        ahead = 0
        for priority in Priority:
            line = self._lines[priority]
            if record in line:
                return ahead + line.index(record)
            ahead += len(line)
        return None

    def drain(self) -> list[JobRecord]:
        """Everything waiting, in order, taken out."""
        waiting = []
        while (record := self.pop()) is not None:
            waiting.append(record)
        return waiting
