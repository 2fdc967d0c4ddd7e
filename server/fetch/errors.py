"""What the fetch stage says when it refuses an entry."""

from __future__ import annotations


class FetchFailure(Exception):
    """A source cannot be fetched, phrased without the entry's prefix (each request waiting on a shared
    fetch adds its own)."""


class LoraSourceError(Exception):
    """A LoRA entry cannot be fetched; `index` says which entry of `loras` (for `loras.<i>.path`)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.3g} {unit}"
