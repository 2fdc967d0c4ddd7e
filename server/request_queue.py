"""Accepted requests waiting for the worker: normal priority before low, first come first served within
each. A request stays withdrawable until the moment it leaves for the worker."""

from __future__ import annotations

from collections import deque

from server.jobs import JobRecord, Priority


class RequestQueue:
    def __init__(self) -> None:
        self._lines: dict[Priority, deque[JobRecord]] = {priority: deque() for priority in Priority}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def push(self, record: JobRecord) -> None:
        self._lines[record.priority].append(record)

    def pop(self) -> JobRecord | None:
        """The next request to run, taken out of the queue; None when nothing waits."""
        for priority in Priority:
            if self._lines[priority]:
                return self._lines[priority].popleft()
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
