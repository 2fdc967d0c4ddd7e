"""The store's database: an engine for a URL, brought to the newest schema at startup."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential

T = TypeVar("T")

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-step chatter; one line below says it all

MIGRATIONS = Path(__file__).with_name("migrations")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class StoreError(Exception):
    """The job store cannot be opened; the message names it and says what to do."""


# What a database's own error says, and what the operator can do about it.
_ADVICE = (
    (
        ("not a database", "malformed"),
        "it is damaged or not a job store: move the file aside to start with "
        "an empty one (the requests it holds are then lost), or restore it from a backup",
    ),
    (("locked",), "another process holds it locked: is another server running on the same data folder?"),
    (
        ("readonly", "read-only", "unable to open", "permission denied"),
        "the server cannot write there: make "
        "the data folder (FLUX2_DATA_DIR) and the file writable by the user the server runs as",
    ),
    (("disk is full", "no space"), "the disk is full: free some space"),
)


_DISK_FULL = "53100"  # PostgreSQL's disk_full: not a server that went away, and not waited for


def _went_away(exc: BaseException) -> bool:
    """A database server that restarted or cannot be reached for now (not one that refuses the work)."""
    return (
        isinstance(exc, OperationalError | InterfaceError)
        and getattr(exc.orig, "sqlstate", None) != _DISK_FULL
    )


class Database:
    """`retry_seconds`: how long a PostgreSQL that went away (a restart, a failover) is waited for before
    a unit of work fails; SQLite is a local file, and its errors are final."""

    def __init__(self, url: str, retry_seconds: float = 15.0) -> None:
        self.url = sa.make_url(url)
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite and self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        # pre-ping: a pooled connection the server dropped (it restarted) is replaced on checkout.
        self.engine = sa.create_engine(self.url, pool_pre_ping=not sqlite)
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._retrying = Retrying(
            retry=retry_if_exception(_went_away),
            stop=stop_after_delay(0 if sqlite else retry_seconds),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        self._waits = not sqlite
        self._gone = False  # the last wait ran out, and nothing has succeeded since

    def run(self, work: Callable[[sa.Connection], T]) -> T:
        """`work` in one transaction, run again from the start while the server is away (within
        `retry_seconds`): the store's every read and write goes through here. It blocks the caller
        meanwhile, the event loop included, which is the price of never refusing or losing a request
        over a database restart of a few seconds. Once a wait has run out, later work is tried once,
        without waiting, until the database answers again: a long outage fails fast instead of stalling
        everything one wait at a time."""
        if self._gone:
            result: T = self._transaction(work)
        else:
            try:
                result = self._retrying(self._transaction, work)
            except (OperationalError, InterfaceError) as exc:
                self._gone = self._waits and _went_away(exc)
                raise
        self._gone = False
        return result

    def _transaction(self, work: Callable[[sa.Connection], T]) -> T:
        with self.engine.begin() as connection:
            return work(connection)

    def migrate(self) -> None:
        """Apply every migration this version has that the database lacks (none: nothing happens); a store
        that cannot be opened raises `StoreError`."""
        try:
            release = self.hold_lock("flux2-migrate")  # processes starting together migrate one at a time
            try:
                self._migrate()
            finally:
                release()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(self._explain(exc)) from exc

    def _explain(self, exc: Exception) -> str:
        where = self.url.database if self.url.get_backend_name() == "sqlite" else self.url.render_as_string()
        reason = str(getattr(exc, "orig", None) or exc)
        advice = next(
            (text for fragments, text in _ADVICE if any(f in reason.lower() for f in fragments)),
            "see the error above",
        )
        return f"the job store {where} cannot be opened ({reason}): {advice}"

    def _migrate(self) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = MigrationContext.configure(connection).get_current_revision()
        if after != before:
            log.info("job store schema: revision %s (was %s)", after, before or "none")

    def hold_lock(self, name: str, wait_seconds: float = 1.0) -> Callable[[], None]:
        """Wait until this process holds the lock `name`, and hold it until the returned release is called
        or the process ends: a PostgreSQL session advisory lock on a connection of its own, or a file lock
        beside an SQLite database. It keeps a second holder out (a scale-out's one dispatcher) even while
        Ray briefly runs an old and a new one side by side."""
        if self.url.get_backend_name() != "sqlite":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            connection = self.engine.connect()
            query = sa.text("SELECT pg_try_advisory_lock(:key)")
            while not connection.execute(query, {"key": key}).scalar():
                log.warning("waiting for the lock %r: another process holds it", name)
                time.sleep(wait_seconds)

            def release_session() -> None:
                connection.invalidate()  # the session ends, and its lock with it, not back to the pool
                connection.close()

            return release_session
        handle = open(f"{self.url.database}.{name}.lock", "a")  # noqa: SIM115 (held until released)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle.close
            except BlockingIOError:
                log.warning("waiting for the lock %r: another process holds it", name)
                time.sleep(wait_seconds)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL: a committed write survives the process being killed (`kill -9`); only a power loss may lose the
    # last transactions (synchronous=NORMAL). Readers never block the writer.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
