"""The Ray Serve configs in deploy/ as Ray reads them, and the application they build: the deployments and
their options come from the settings, and the Serve config file and the KubeRay RayService agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pipeline.models import load_registry
from server.config import Settings
from server.scaleout.application import application, build

ROOT = Path(__file__).resolve().parents[2]


def deployments(app: Any) -> dict[str, Any]:
    """The deployments an application binds: the ingress, the dispatcher (the ingress's third argument),
    the GPU workers (the dispatcher's)."""
    ingress = app._bound_deployment
    dispatcher = ingress.init_args[2]._bound_deployment
    worker = dispatcher.init_args[2]._bound_deployment
    return {ingress.name: ingress, dispatcher.name: dispatcher, worker.name: worker}


def serve_config(document: dict[str, Any]) -> dict[str, Any]:
    schema = ServeDeploySchema.model_validate(document)
    (only,) = schema.applications
    assert only.import_path == "server.scaleout.application:build" and only.route_prefix == "/"
    return dict(only.args)


def test_the_serve_config_builds_autoscaled_gpu_workers_behind_one_dispatcher_and_two_ingresses() -> None:
    args = serve_config(yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text()))
    built = deployments(build(args))
    worker = built["gpu-worker"]
    assert worker.ray_actor_options["num_gpus"] == 1
    scaling = worker._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert worker._deployment_config.max_ongoing_requests == 1  # one job per GPU
    assert built["ingress"]._deployment_config.num_replicas == 2
    assert built["dispatcher"]._deployment_config.num_replicas == 1  # the one queue


def test_the_rayservice_deploys_the_same_application() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text()))
    service = next(d for d in documents if d["kind"] == "RayService")
    args = serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert args == serve_config(yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text()))
    gpu = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert gpu["maxReplicas"] == args["ray_workers_max"]


def test_cpu_replicas_at_a_fixed_count_and_folders_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.load(env={}, ray_workers_min=2, ray_workers_max=2, ray_gpus_per_worker=0)
    built = deployments(application(settings, load_registry(settings.models_file)))
    worker = built["gpu-worker"]
    assert (
        worker._deployment_config.num_replicas == 2 and worker._deployment_config.autoscaling_config is None
    )
    assert worker.ray_actor_options["num_gpus"] == 0
    config = worker.init_args[0]  # the WorkerConfig every replica loads with
    assert config.cache_dir.is_absolute()
    ingress_settings = built["ingress"].init_args[0]
    assert ingress_settings.data_dir == tmp_path / "data"
