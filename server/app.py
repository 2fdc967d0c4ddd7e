"""The FastAPI application: the rooms of the HTTP side built and joined, routes, and their lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pipeline.models import Registry
from server import openapi
from server.auth import KeyRing
from server.config import Settings
from server.desk import Desk, LocalDesk
from server.errors import FalHTTPError, handle_fal_error
from server.fetch.lora_fetcher import LoraFetcher
from server.fetch.reference_images import ReferenceFetcher
from server.fetch.stage import FetchStage
from server.files import FileStore
from server.metrics import Metrics
from server.middleware import FalRoutingMiddleware, SizeLimitMiddleware
from server.outputs import OutputBuilder
from server.routes import ops, playground, queue, run, storage
from server.scheduler import Scheduler
from server.schemas import APPS
from server.services import Services
from server.store.database import Database
from server.store.job_store import WRITE_ERRORS, SqlJobStore
from server.supervisor import Worker, WorkerFactory
from server.uploads import PendingUploads
from server.webhooks import WebhookSender, WebhookSigner
from server.worker_process import Listener, WorkerProcess

log = logging.getLogger(__name__)


async def _clean_up(scheduler: Scheduler, files: FileStore, ttl: float) -> None:
    """Forget completed requests older than `ttl`, and delete files as old, every so often. A failed
    round (a store that cannot be written right now) is tried again at the next."""
    while True:
        try:
            scheduler.prune(ttl)
            files.expire(time.time() - ttl)
        except WRITE_ERRORS as exc:
            log.error("cleaning up old requests and files failed; trying again later: %s", exc)
        await asyncio.sleep(min(60.0, max(ttl / 10, 0.05)))


def _body_caps(settings: Settings) -> Callable[[str], int | None]:
    """The routes with their own body cap: edits (references as data: URIs) and uploads."""
    edits = {f"{prefix}/{app}" for app in APPS if app.endswith("/edit") for prefix in ("", "/queue")}

    def cap(path: str) -> int | None:
        if path in edits:
            return settings.edit_body_max_bytes
        if path == "/files/upload" or path.startswith("/storage/upload/"):
            return settings.upload_max_bytes
        return None

    return cap


def open_store(settings: Settings) -> tuple[Database, FileStore]:
    """The job store, brought to the newest schema (one that cannot be opened raises `StoreError`: the
    start stops before anything is served), and the stored files' home over it."""
    database = Database(settings.job_store_url, settings.database_retry_seconds)
    database.migrate()
    return database, FileStore(settings.files_dir, database)


def _webhooks(settings: Settings) -> WebhookSender:
    signer = WebhookSigner(settings.data_dir / "keys")
    return WebhookSender(signer, allow_private_addresses=settings.allow_private_webhook_urls)


class BackOffice:
    """Everything behind the desk, in the one process that holds the queue: the fetch stage, the
    scheduler and its workers, completion, webhooks, metrics and the clean-up of old requests. The
    single-process server has it inside its app; in scale-out it is the dispatcher deployment."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        database: Database,
        files: FileStore,
        worker_factory: WorkerFactory | None = None,
        worker_slots: int = 1,
    ) -> None:
        self.settings = settings
        self.fetcher = LoraFetcher(settings.lora_policy())
        self.webhooks = _webhooks(settings)

        def spawn_worker(listener: Listener) -> Worker:
            return WorkerProcess(settings.worker_config(registry), listener)

        references = ReferenceFetcher(settings.reference_policy(), self.fetcher.downloads, files)
        self.scheduler = Scheduler(
            worker_factory or spawn_worker,
            OutputBuilder(files),
            FetchStage(self.fetcher, references),
            Metrics(self.fetcher.cache),
            store=SqlJobStore(database),
            webhooks=self.webhooks,
            limits=settings.watchdog_limits(),
            worker_slots=worker_slots,
        )
        self.files = files
        self.desk = LocalDesk(self.scheduler, settings.model or "auto")
        self._cleaner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the workers and take back what the store holds (on the running event loop)."""
        self.scheduler.start()
        self.scheduler.recover()
        ttl = self.settings.result_ttl_seconds
        self._cleaner = asyncio.create_task(_clean_up(self.scheduler, self.files, ttl))

    async def stop(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
        await self.scheduler.stop(self.settings.shutdown_grace_seconds)
        await self.fetcher.aclose()
        await self.webhooks.aclose()


def create_app(
    settings: Settings,
    registry: Registry,
    worker_factory: WorkerFactory | None = None,
    desk: Desk | None = None,
) -> FastAPI:
    """Build the app. `worker_factory` puts other workers behind the typed worker interface (stand-ins in
    unit tests). `desk` makes the app an ingress that leaves the requests to a back office elsewhere (a
    scale-out ingress replica's `RemoteDesk`); without it, the back office is in this process."""
    database, files = open_store(settings)
    office = None
    if desk is None:
        office = BackOffice(settings, registry, database, files, worker_factory)
        desk = office.desk
    webhooks = office.webhooks if office else _webhooks(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if office is not None:
            await office.start()
        try:
            yield
        finally:
            if office is not None:
                await office.stop()
            else:
                await webhooks.aclose()
            database.close()

    app = FastAPI(
        title="flux2-lora-server",
        version="0.1.0",
        summary="FLUX.2 [dev] with LoRAs, behind fal's API for fal-ai/flux-2/lora",
        lifespan=lifespan,
    )
    app.state.services = Services(
        settings=settings,
        desk=desk,
        scheduler=office.scheduler if office else None,
        files=files,
        keys=KeyRing.from_settings(settings.api_keys, settings.api_keys_file),
        webhooks=webhooks,
        uploads=PendingUploads(database),
    )
    app.add_exception_handler(FalHTTPError, handle_fal_error)
    app.add_middleware(
        SizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        path_cap=_body_caps(settings),
    )
    app.add_middleware(FalRoutingMiddleware)
    for module in (run, queue, ops, storage, playground):
        app.include_router(module.router)
    openapi.install(app)
    return app
