"""Shared fixtures: a live server on loopback running the real tiny FLUX.2 pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from server.testing import LiveServer


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the tiny model is built: the server's own default, so it is built once per machine."""
    return Settings.load().cache_dir


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The live server's allowed local LoRA folder."""
    return tmp_path_factory.mktemp("lora-folder")


@pytest.fixture(scope="session")
def live_server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, lora_folder: Path
) -> Iterator[LiveServer]:
    env = {
        "FLUX2_CACHE_DIR": str(cache_dir),
        "FLUX2_SSE_PING_SECONDS": "1",
        "FLUX2_ALLOW_PRIVATE_LORA_URLS": "true",  # LoRA files come from a server on loopback
        "FLUX2_LORA_FOLDERS": str(lora_folder),
        "FLUX2_MAX_LORA_RANK": "16",
    }
    with LiveServer(tmp_path_factory.mktemp("live"), "--model", "tiny", env=env) as server:
        yield server
