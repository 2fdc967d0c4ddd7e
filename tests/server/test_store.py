"""The durable job store: round trips on SQLite and PostgreSQL, migrations that match the table definition
and upgrade stores of every earlier version, restarts that lose nothing, and retention."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline.messages import GenerationParams
from server.fetch.lora_fetcher import LoraRequest
from server.jobs import JobRecord, JobStatus, Priority
from server.outcome import Failure, failed
from server.store.database import Database, sqlite_url
from server.store.job_store import SqlJobStore
from server.store.tables import metadata
from server.testing import PostgresServer, free_port
from tests.server.conftest import _harness

SUBMIT = "/queue/fal-ai/flux-2/lora"
BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database of each kind the store serves."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "jobs.sqlite")
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.database()


def migrated(url: str) -> Database:
    database = Database(url)
    database.migrate()
    return database


def test_round_trip(url: str) -> None:
    database = migrated(url)
    store = SqlJobStore(database)
    params = GenerationParams("p", None, None, 4, 2.5, 2**64 - 1)
    loras = (LoraRequest("a/b", 0.5),)
    references = ("https://example.com/a.png", "data:image/png;base64,AAAA")
    record = JobRecord(
        "r1",
        "fal-ai/flux-2/lora/edit",
        {"prompt": "p"},
        "http://h/",
        params=params,
        loras=loras,
        durable=True,
    )
    record.image_urls = references
    record.priority = Priority.LOW
    record.log("hello")
    store.save(record)
    record.complete(failed(Failure.WORKER_LOST, "gone"), 1.5)
    store.save(record)
    database.close()

    loaded = SqlJobStore(migrated(url)).load("r1")
    assert loaded is not None
    assert loaded.params == params and loaded.loras == loras and loaded.priority is Priority.LOW
    assert loaded.image_urls == references
    assert loaded.status is JobStatus.COMPLETED and loaded.inference_seconds == 1.5
    assert loaded.outcome == record.outcome
    assert [entry.message for entry in loaded.logs] == ["hello"]


def test_restart_runs_what_was_queued_or_running_and_keeps_what_finished(tmp_path: Path) -> None:
    first = _harness(tmp_path, hold=True)
    h = next(first)
    done = h.client.post(SUBMIT, json=BODY).json()
    h.worker.release()
    running, queued = h.client.post(SUBMIT, json=BODY).json(), h.client.post(SUBMIT, json=BODY).json()
    invalid = h.client.post(SUBMIT, json={"prompt": ""}).json()
    first.close()  # the server goes away with one request running and one queued

    second = _harness(tmp_path, hold=False)
    h = next(second)
    try:
        for accepted in (running, queued):
            assert h.client.get(accepted["response_url"]).status_code == 200
        assert [job.request_id for job in h.worker.submitted] == [running["request_id"], queued["request_id"]]
        assert h.client.get(done["response_url"]).status_code == 200  # still readable
        assert h.client.get(invalid["response_url"]).status_code == 422
        logs = h.client.get(running["status_url"], params={"logs": 1}).json()["logs"]
        assert any("requeued after a server restart" in entry["message"] for entry in logs)
    finally:
        second.close()


def test_retention_forgets_old_results_and_their_files(tmp_path: Path) -> None:
    gen = _harness(tmp_path, hold=False, result_ttl_seconds=0.3)
    h = next(gen)
    try:
        accepted = h.client.post(SUBMIT, json=BODY).json()
        image = h.client.get(accepted["response_url"]).json()["images"][0]
        assert h.client.get(image["url"]).status_code == 200
        time.sleep(1.0)
        assert h.client.get(accepted["status_url"]).status_code == 404
        assert h.client.get(image["url"]).status_code == 404
        assert (
            SqlJobStore(migrated(sqlite_url(tmp_path / "data" / "jobs.sqlite"))).load(accepted["request_id"])
            is None
        )
    finally:
        gen.close()


def test_migrations_make_exactly_the_table_definition(url: str) -> None:
    database = migrated(url)
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    database.migrate()  # at the newest revision already: nothing to do
    database.close()


# The schema the first release wrote by hand, before migrations existed.
FIRST_SCHEMA = """
CREATE TABLE jobs (
    request_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, request_input TEXT NOT NULL,
    base_url TEXT NOT NULL, params TEXT, priority INTEGER NOT NULL, start_timeout REAL,
    status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    inference_seconds REAL, logs TEXT NOT NULL, outcome TEXT, owner TEXT, webhook_url TEXT
);
CREATE INDEX jobs_by_finish ON jobs (finished_at);
"""
OLD_PARAMS = (
    '{"prompt": "p", "width": 512, "height": 512, "num_inference_steps": 4, "guidance_scale": 2.5, "seed": 7,'
    ' "num_images": 1, "output_format": "png", "acceleration": "regular", "enable_safety_checker": true,'
    ' "enable_prompt_expansion": false, "loras": [{"path": "a/b", "scale": 0.5, "file": "/x.safetensors",'
    ' "sha256": "ab12"}]}'
)


def test_a_store_from_before_webhook_pending_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(FIRST_SCHEMA)
    old.execute(
        "INSERT INTO jobs (request_id, app_id, request_input, base_url, priority, status, created_at, logs,"
        " webhook_url) VALUES ('r1', 'fal-ai/flux-2', '{}', 'http://h/', 0, 'COMPLETED', 1.0, '[]', NULL)"
    )
    old.commit()
    assert "webhook_pending" not in {row[1] for row in old.execute("PRAGMA table_info(jobs)")}
    old.close()
    loaded = SqlJobStore(migrated(sqlite_url(path))).load("r1")
    assert loaded is not None and loaded.webhook_pending is False


def test_a_store_from_before_migrations_keeps_its_requests_and_their_loras(tmp_path: Path) -> None:
    """The last hand-written schema (webhook_pending added by hand, LoRAs inside params) is upgraded in
    place: its queued request still runs with the LoRAs it asked for."""
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        FIRST_SCHEMA + "ALTER TABLE jobs ADD COLUMN webhook_pending INTEGER NOT NULL DEFAULT 0;"
    )
    old.execute(
        "INSERT INTO jobs (request_id, app_id, request_input, base_url, params, priority, status, created_at,"
        " logs, webhook_pending) VALUES ('r2', 'fal-ai/flux-2/lora', '{}', 'http://h/', ?, 1, 'IN_QUEUE',"
        " 2.0, '[]', 0)",
        (OLD_PARAMS,),
    )
    old.commit()
    old.close()
    database = migrated(sqlite_url(path))
    (loaded,) = SqlJobStore(database).load_unfinished()
    assert loaded.loras == (LoraRequest("a/b", 0.5),) and loaded.priority is Priority.LOW
    assert loaded.params == GenerationParams("p", 512, 512, 4, 2.5, 7)
    with database.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() is not None


def test_files_of_requests_completed_before_the_files_table_stay_served_to_their_owner(
    tmp_path: Path,
) -> None:
    from server.files import FileStore

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(FIRST_SCHEMA)
    outcome = (
        '{"status_code": 200, "body": {"images": [{"file_name": "0123456789abcdef0123456789abcdef.png"}]},'
        ' "error": null, "error_type": null, "headers": {}}'
    )
    old.execute(
        "INSERT INTO jobs (request_id, app_id, request_input, base_url, params, priority, status, created_at,"
        " finished_at, logs, outcome, owner) VALUES ('r3', 'fal-ai/flux-2', '{}', 'http://h/', NULL, 0,"
        " 'COMPLETED', 1.0, 2.0, '[]', ?, 'alpha')",
        (outcome,),
    )
    old.commit()
    old.close()
    files = FileStore(tmp_path / "files", migrated(sqlite_url(path)))
    (tmp_path / "files" / "0123456789abcdef0123456789abcdef.png").write_bytes(b"png")
    assert files.path_for("0123456789abcdef0123456789abcdef.png", "alpha") is not None
    assert files.path_for("0123456789abcdef0123456789abcdef.png", "beta") is None
    assert files.expire(cutoff=2.5) == 1 and not any((tmp_path / "files").iterdir())


def test_memory_holds_only_unfinished_requests_and_a_restart_reads_only_those(tmp_path: Path) -> None:
    first = _harness(tmp_path, hold=True)
    h = next(first)
    finished = h.client.post(SUBMIT, json=BODY).json()
    h.worker.release()
    running = h.client.post(SUBMIT, json=BODY).json()
    scheduler = h.services.scheduler
    assert set(scheduler.jobs) == {running["request_id"]}  # the finished one lives in the store only
    assert h.client.get(finished["response_url"]).status_code == 200  # read back from it by id
    first.close()

    second = _harness(tmp_path, hold=True)
    h = next(second)
    try:
        scheduler = h.services.scheduler
        assert set(scheduler.jobs) == {running["request_id"]}
        assert h.client.get(finished["status_url"]).json()["status"] == "COMPLETED"
        assert h.client.put(finished["cancel_url"]).status_code == 400  # already completed
    finally:
        second.close()


def test_a_database_that_went_away_is_waited_for_once_then_failed_fast() -> None:
    database = Database(f"postgresql+psycopg://flux2@127.0.0.1:{free_port()}/jobs", retry_seconds=0.6)
    store = SqlJobStore(database)
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        store.load("anything")
    assert time.monotonic() - started >= 0.6  # waited for it to come back, with retries
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        store.load("anything")
    assert time.monotonic() - started < 0.5  # still gone: no second wait until it answers again
    database.close()


def test_a_lock_keeps_a_second_holder_waiting_until_the_first_lets_go(url: str) -> None:
    """The scale-out dispatcher's: one holder at a time, on either database."""
    first, second = Database(url), Database(url)
    release = first.hold_lock("dispatcher")
    taken: list[Callable[[], None]] = []
    waiter = threading.Thread(target=lambda: taken.append(second.hold_lock("dispatcher", wait_seconds=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not taken  # still waiting
    release()
    waiter.join(5)
    assert taken
    taken[0]()
    first.close()
    second.close()
