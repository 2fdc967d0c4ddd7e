"""Live servers for the tests and the scripts alike: `flux2-server serve` started the way a user starts
it, and a throwaway PostgreSQL.

The installed console script runs in a subprocess from the server's own data folder (so nothing depends
on the repository being the working directory), on a free loopback port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from server.jobs import JobStatus
from server.store.database import Database, sqlite_url
from server.store.job_store import SqlJobStore

READY_TIMEOUT_SECONDS = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def installed_command() -> str:
    """The `flux2-server` console script of the running Python's environment."""
    command = shutil.which("flux2-server", path=str(Path(sys.executable).parent))
    if command is None:
        raise RuntimeError(f"flux2-server is not installed beside {sys.executable} (pip install -e .)")
    return command


class LiveServer:
    """`flux2-server serve` in a subprocess; `with LiveServer(...) as server:` waits until it is ready and
    stops it on the way out."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        tls: bool = False,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        # With --tls the certificate names localhost (and 127.0.0.1); our own polls trust the server's CA.
        self.url = f"https://localhost:{self.port}" if tls else f"http://127.0.0.1:{self.port}"
        self.tls = tls
        args = (*args, "--tls") if tls else args
        self.log_path = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [installed_command(), "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        self._log = self.log_path.open("ab")  # a restart on the same folder adds to the log
        self.process = subprocess.Popen(
            [*command, *args],
            cwd=data_dir,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def verify(self) -> ssl.SSLContext | bool:
        """What a client needs to trust this server: its local CA when it serves HTTPS."""
        return ssl.create_default_context(cafile=self.data_dir / "tls" / "ca.pem") if self.tls else True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> httpx.Response:
        return self.wait_for_ready_state(lambda ready: ready.status_code == 200, timeout)

    def wait_for_ready_state(
        self, accept: Callable[[httpx.Response], bool], timeout: float = READY_TIMEOUT_SECONDS
    ) -> httpx.Response:
        """Poll `/ready` until `accept` likes the answer; fail fast if the server process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                ready = httpx.get(f"{self.url}/ready", timeout=2, verify=self.verify())
                if accept(ready):
                    return ready
            except (httpx.TransportError, FileNotFoundError):  # not up yet, or its CA not written yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not in the awaited state after {timeout} s:\n{self.log()}")

    def __enter__(self) -> LiveServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def kill(self) -> None:
        """`kill -9`: no shutdown code runs (the worker notices its parent is gone and exits)."""
        self.process.kill()
        self.process.wait()
        self._log.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextmanager
def job_store(where: Path | str) -> Iterator[SqlJobStore]:
    """A server's job store, closed after use: the one in its data folder (the server stopped, or not),
    or at a database URL."""
    database = Database(where if isinstance(where, str) else sqlite_url(where / "jobs.sqlite"))
    try:
        yield SqlJobStore(database)
    finally:
        database.close()


def stored_statuses(data_dir: Path, request_ids: Iterable[str]) -> list[JobStatus | None]:
    """The status the job store holds for each request (None: it holds no such request)."""
    with job_store(data_dir) as store:
        return [record.status if (record := store.load(rid)) else None for rid in request_ids]


def lost_and_duplicated(data_dir: Path, submitted: int, ids: list[str]) -> tuple[int, int]:
    """What a server's job store says about `submitted` requests whose submits answered `ids`: how many are
    missing from it, and how many ids appear more than once or were never handed out."""
    with job_store(data_dir) as store:
        rows = store.request_ids()
    lost = submitted - len(set(ids) & set(rows))
    duplicated = (len(ids) - len(set(ids))) + (len(rows) - len(set(rows))) + len(set(rows) - set(ids))
    return lost, duplicated


class PostgresServer:
    """A throwaway PostgreSQL server on a free loopback port, from the machine's `initdb` and `pg_ctl`;
    `database()` makes a fresh database on it and answers its SQLAlchemy URL."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="flux2-postgres-"))
        self.port = free_port()
        # PostgreSQL refuses to run as root: then it runs as the machine's postgres user.
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "flux2", "--auth=trust", "-E", "UTF8")
        self._data = data
        self._count = 0
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.folder / "log")
        self._run("pg_ctl", "-D", str(self._data), "-o", options, "-l", log, "-w", "start")

    def restart(self, down_seconds: float) -> None:
        """Stop the server (its connections cut, as in a real restart or failover), stay down a while,
        start it again."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")
        time.sleep(down_seconds)
        self.start()

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://flux2@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        import psycopg

        self._count += 1
        name = f"test_{os.getpid()}_{self._count}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=flux2 dbname=postgres", autocommit=True
        ) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
