from __future__ import annotations

from collections.abc import Iterator

import fal_client
import fal_client.client
import pytest

from server.testing import LiveServer, PostgresServer


def fal_client_at(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """The real fal_client, pointed at a live server the documented way (module URL formats)."""
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server.url}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server.url}/queue/")
    monkeypatch.setenv("FAL_KEY", "any-key")
    return fal_client.SyncClient()


@pytest.fixture
def fal(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[fal_client.SyncClient]:
    yield fal_client_at(live_server, monkeypatch)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server; each user makes its own database on it."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()
