"""Errors raised inside the worker, each tagged with the failure kind the HTTP side maps to an answer."""

from __future__ import annotations

from pipeline.messages import FailureKind


class PipelineError(Exception):
    kind = FailureKind.INTERNAL

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc  # the input to blame, e.g. ("loras", 1, "path")


class InvalidInput(PipelineError):
    """The request can never succeed as sent; the same input would fail again."""

    kind = FailureKind.INVALID_INPUT


class Cancelled(PipelineError):
    """Raised from the step callback when the client cancelled the request in progress."""

    kind = FailureKind.CANCELLED

    def __init__(self) -> None:
        super().__init__("Request was cancelled")
