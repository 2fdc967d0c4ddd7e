"""Shared fixtures: a live server on loopback running the real tiny FLUX.2 pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from tests.live import LiveServer


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the tiny model is built: the server's own default, so it is built once per machine."""
    return Settings.load().cache_dir


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(
        tmp_path_factory.mktemp("live"),
        "--model",
        "tiny",
        env={"FLUX2_CACHE_DIR": str(cache_dir), "FLUX2_SSE_PING_SECONDS": "1"},
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
