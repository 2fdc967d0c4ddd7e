from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.fetch.lora_server import LoraServer


@pytest.fixture
def server() -> Iterator[LoraServer]:
    s = LoraServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
