from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.models import load_registry
from server.app import create_app
from server.config import Settings
from server.scheduler import Scheduler
from tests.server.standin import StandInWorker

ROOT = Path(__file__).resolve().parents[2]


class Harness:
    def __init__(self, client: TestClient, worker: StandInWorker) -> None:
        self.client = client
        self.worker = worker


def _harness(tmp_path: Path, hold: bool, **overrides: object) -> Iterator[Harness]:
    workers: list[StandInWorker] = []

    def factory(scheduler: Scheduler) -> StandInWorker:
        workers.append(StandInWorker(scheduler.listener, hold=hold))
        return workers[-1]

    settings = Settings.load(
        env={}, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", sse_ping_seconds=0.2, **overrides
    )
    app = create_app(settings, load_registry(ROOT / "models.yaml"), worker_factory=factory)
    with TestClient(app, base_url="http://testserver") as client:
        client.get("/ready")  # lets the stand-in's WorkerReady through
        yield Harness(client, workers[0])


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from _harness(tmp_path, hold=False)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Harness]:
    """A server whose stand-in worker keeps each job running until released."""
    yield from _harness(tmp_path, hold=True)
