from __future__ import annotations

from collections.abc import Iterator

import fal_client
import fal_client.client
import pytest

from server.testing import LiveServer


@pytest.fixture
def fal(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[fal_client.SyncClient]:
    """The real fal_client, pointed at the live server the documented way (module URL formats)."""
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{live_server.url}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{live_server.url}/queue/")
    monkeypatch.setenv("FAL_KEY", "any-key")
    yield fal_client.SyncClient()
