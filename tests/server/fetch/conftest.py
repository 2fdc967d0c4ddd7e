from __future__ import annotations

import pytest

from tests.server.fetch.lora_server import LoraServer


@pytest.fixture
def server(lora_server: LoraServer) -> LoraServer:
    """The fetch tests' name for the LoRA file server."""
    return lora_server
