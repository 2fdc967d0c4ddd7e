"""Stopping a group of fetch tasks when one of them fails (or the request is withdrawn)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


async def cancel_and_collect(tasks: Sequence[asyncio.Task[T]]) -> list[T]:
    """Cancel the tasks, wait until each has ended, and return the results of those that had already
    succeeded: what they fetched is held and must still be let go of."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [task.result() for task in tasks if not task.cancelled() and task.exception() is None]
