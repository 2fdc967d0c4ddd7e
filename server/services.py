"""What the routes work with, built once by `create_app`, and the FastAPI dependency that hands it over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

if TYPE_CHECKING:  # types only: the modules below (auth's dependency among them) import this one
    from server.auth import KeyRing
    from server.config import Settings
    from server.desk import Desk
    from server.files import FileStore
    from server.scheduler import Scheduler
    from server.uploads import PendingUploads
    from server.webhooks import WebhookSender


@dataclass(frozen=True)
class Services:
    settings: Settings
    desk: Desk  # the requests: accept, find, watch, cancel; readiness and metrics
    scheduler: Scheduler | None  # where the queue is in this process (not on a scale-out ingress)
    files: FileStore
    keys: KeyRing
    webhooks: WebhookSender
    uploads: PendingUploads


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
