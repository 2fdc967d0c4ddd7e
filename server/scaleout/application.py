"""The Ray Serve application, three deployments: the fal front door (`server.app.create_app`) as the
ingress, with as many replicas as configured, each asking the one dispatcher (`Dispatcher`: the queue, and
a worker slot per possible GPU replica streaming jobs to it) about requests, over the GPU worker
deployment (`GpuWorker`, one GPU per replica, autoscaled between the configured bounds).
`flux2-server serve --ray` runs it; `serve run` / `serve deploy` take `build` through the Serve config
file in `deploy/` of the repository.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from pipeline.logs import configure_logging
from pipeline.models import Registry, load_registry
from server.app import create_app
from server.config import Settings
from server.scaleout.dispatcher import Dispatcher
from server.scaleout.gpu_worker import GpuWorker
from server.scaleout.remote_desk import RemoteDesk

log = logging.getLogger(__name__)

APP_NAME = "flux2"


@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, registry: Registry, dispatcher: DeploymentHandle[Any]) -> None:
        configure_logging(settings.log_level, settings.log_json)
        self._settings, self._registry, self._dispatcher = settings, registry, dispatcher

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._settings, self._registry, desk=RemoteDesk(self._dispatcher))


def application(settings: Settings, registry: Registry) -> Application:
    """Both deployments, bound to the settings. Folders are made absolute here: replicas do not run in
    the folder the operator started from."""
    keys = settings.api_keys_file
    settings = settings.model_copy(
        update={
            "data_dir": settings.data_dir.resolve(),
            "cache_dir": settings.cache_dir.resolve(),
            "lora_folders": tuple(folder.resolve() for folder in settings.lora_folders),
            "api_keys_file": keys.resolve() if keys else None,
        }
    )
    if settings.ray_workers_min == settings.ray_workers_max:
        scaling: dict[str, Any] = {"num_replicas": settings.ray_workers_max}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": settings.ray_workers_min,
                "max_replicas": settings.ray_workers_max,
                "target_ongoing_requests": 1,  # a replica runs one job: more waiting asks for another
            }
        }
    workers = serve.deployment(
        name="gpu-worker",
        max_ongoing_requests=1,  # one job per GPU; the rest wait in the ingress's queue
        ray_actor_options={"num_gpus": settings.ray_gpus_per_worker, "num_cpus": 1},
        health_check_period_s=10,
        **scaling,
    )(GpuWorker).bind(
        settings.worker_config(registry),
        settings.ray_lora_sets_per_worker,
        settings.heartbeat_seconds,
    )
    dispatcher = serve.deployment(
        name="dispatcher",
        num_replicas=1,  # the one queue: its lock in the job store keeps a second one waiting
        max_ongoing_requests=100_000,  # status streams and sync runs wait here: the queue limits work
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_grace_seconds + 5,
    )(Dispatcher).bind(settings, registry, workers)
    ingress = serve.deployment(
        name="ingress",
        num_replicas=settings.ray_ingress_replicas,
        max_ongoing_requests=10_000,  # status polls and streams: the queue limits work, not this
        ray_actor_options={"num_cpus": 0},
    )(Ingress)
    return ingress.bind(settings, registry, dispatcher)


def run(settings: Settings, registry: Registry) -> str | None:
    """`flux2-server serve --ray`: the application on a Ray cluster (`FLUX2_RAY_ADDRESS`), or on one
    started here, until a stop signal; then it is taken down, the ingress draining as `serve` does.
    Returns why it could not be deployed, if it could not (the replicas' own errors are logged above)."""
    ray.init(address=settings.ray_address, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own (an abrupt exit)
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application(settings, registry), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a deployment whose replicas cannot start (a model that cannot load)
            serve.shutdown()
            return f"the Ray Serve application could not be deployed: {exc}"
        log.warning("serving on http://%s:%d (Ray Serve)", settings.host, settings.port)
        stop.wait()
        # The dispatcher drains first, while the GPU workers still run its last jobs; then all goes.
        dispatcher = serve.get_deployment_handle("dispatcher", APP_NAME)
        dispatcher.drain.remote().result(timeout_s=settings.shutdown_grace_seconds + 30)
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return None


def build(args: dict[str, Any]) -> Application:
    """The Serve config's `import_path`: `args` are settings by name, over the FLUX2_* variables."""
    settings = Settings.load(**args)
    return application(settings, load_registry(settings.models_file))
