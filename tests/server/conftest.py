from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from pipeline.models import load_registry
from server.app import create_app
from server.config import Settings
from server.services import Services
from server.worker_process import Listener
from tests.server.fetch.lora_server import LoraServer
from tests.server.standin import StandInWorker

ROOT = Path(__file__).resolve().parents[2]


class SettledClient(TestClient):
    """A test client that lets the server finish what the stand-in worker set off (images being stored)
    before each call, as the round trip of a real client would."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        services: Services = self.app.state.services  # type: ignore[attr-defined]
        if self.portal is not None:
            self.portal.call(services.scheduler.completion.drain)
        return super().send(request, **kwargs)


class Harness:
    def __init__(self, client: TestClient, worker: StandInWorker) -> None:
        self.client = client
        self.worker = worker

    @property
    def services(self) -> Services:
        services: Services = self.client.app.state.services  # type: ignore[attr-defined]
        return services


def wait_completed(h: Harness, status_url: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = h.client.get(status_url).json()
        if status["status"] == "COMPLETED":
            return dict(status)
        time.sleep(0.02)
    raise AssertionError("not completed in time")


def _harness(
    tmp_path: Path, hold: bool, worker: dict[str, bool] | None = None, **overrides: object
) -> Iterator[Harness]:
    """A server on a stand-in worker (`worker`: its StandInWorker options), settings as `overrides`."""
    workers: list[StandInWorker] = []

    def factory(listener: Listener) -> StandInWorker:
        workers.append(StandInWorker(listener, hold=hold, **(worker or {})))
        return workers[-1]

    overrides = {"sse_ping_seconds": 0.2, "shutdown_grace_seconds": 0.2, **overrides}  # held jobs never end
    settings = Settings.load(env={}, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", **overrides)
    app = create_app(settings, load_registry(ROOT / "models.yaml"), worker_factory=factory)
    with SettledClient(app, base_url="http://testserver") as client:
        stand_in = workers[0]
        stand_in.portal = client.portal
        stand_in.settle = app.state.services.scheduler.completion.drain
        client.get("/ready")  # lets the stand-in's WorkerReady through
        yield Harness(client, stand_in)


@pytest.fixture
def lora_server() -> Iterator[LoraServer]:
    """LoRA files served on loopback, scripted per path."""
    server = LoraServer()
    yield server
    server.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from _harness(tmp_path, hold=False)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Harness]:
    """A server whose stand-in worker keeps each job running until released."""
    yield from _harness(tmp_path, hold=True)
