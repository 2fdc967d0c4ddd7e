"""The store's database: an engine for a URL, brought to the newest schema at startup."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import SQLAlchemyError

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


class Database:
    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(self.url)
        if self.url.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def migrate(self) -> None:
        """Apply every migration this version has that the database lacks (none: nothing happens); a store
        that cannot be opened raises `StoreError`."""
        try:
            self._migrate()
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

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL: a committed write survives the process being killed (`kill -9`); only a power loss may lose the
    # last transactions (synchronous=NORMAL). Readers never block the writer.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
