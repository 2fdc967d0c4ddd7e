"""Scale-out: `flux2-server serve --ray`, run as an operator runs it, on a Ray instance it starts itself:
two ingress replicas sharing one dispatcher and a PostgreSQL job store, two CPU worker replicas of the
tiny model, behind the same fal routes. The real clients, LoRA-affine routing, a cancel; an ingress, the
dispatcher and a worker replica killed with requests in hand, and PostgreSQL restarted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from diffusers import Flux2Transformer2DModel

from pipeline.testing import linear_shapes, write_lora
from pipeline.tiny import ensure_tiny_pipeline
from server.jobs import JobStatus
from server.testing import LiveServer, PostgresServer, free_port, installed_command, job_store
from tests.e2e.conftest import fal_client_at
from tests.node import JS_DIR, node_available

APP = "fal-ai/flux-2/lora"
_STARTED = re.compile(r"generation started on replica (\S+) \(pid (\d+)\)")


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    transformer = Flux2Transformer2DModel.from_pretrained(
        ensure_tiny_pipeline(cache_dir / "tiny") / "transformer"
    )
    shapes = linear_shapes(transformer)
    names, folder = list(shapes), tmp_path_factory.mktemp("scaleout-loras")
    return {
        "style": write_lora(folder / "style.safetensors", shapes, names[:8], rank=8, seed=1),
        "detail": write_lora(folder / "detail.safetensors", shapes, names[4:12], rank=4, seed=2),
    }


@pytest.fixture(scope="module")
def store_url(postgres: PostgresServer) -> str:
    return postgres.database()


@pytest.fixture(scope="module")
def ray_server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, loras: dict[str, Path], store_url: str
) -> Iterator[LiveServer]:
    env = {
        "FLUX2_DATABASE_URL": store_url,
        "FLUX2_RAY_INGRESS_REPLICAS": "2",
        "FLUX2_CACHE_DIR": str(cache_dir),
        "FLUX2_LORA_FOLDERS": str(loras["style"].parent),
        "FLUX2_MAX_LORA_RANK": "16",
        "FLUX2_SSE_PING_SECONDS": "1",
        "FLUX2_RAY_WORKERS_MIN": "2",
        "FLUX2_RAY_WORKERS_MAX": "2",
        "FLUX2_RAY_GPUS_PER_WORKER": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    server = LiveServer(tmp_path_factory.mktemp("ray-serve"), "--ray", "--model", "tiny", env=env)
    with server:
        yield server
    assert server.process.returncode == 0, server.log()[-3000:]  # SIGTERM takes it all down in order


@pytest.fixture
def fal(ray_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    return fal_client_at(ray_server, monkeypatch)


def _body(lora: Path | None = None, steps: int = 4, scale: float = 0.8, **extra: Any) -> dict[str, Any]:
    loras = [{"path": str(lora), "scale": scale}] if lora else []
    return {
        "prompt": "a lighthouse",
        "image_size": "square",
        "num_inference_steps": steps,
        "loras": loras,
        **extra,
    }


def _replica(ray_server: LiveServer, request_id: str) -> list[tuple[str, int]]:
    """Where a request ran, from its status logs: (replica, pid) for each start."""
    status = httpx.get(
        f"{ray_server.url}/queue/fal-ai/flux-2/requests/{request_id}/status", params={"logs": 1}, timeout=10
    ).json()
    return [
        (match[1], int(match[2]))
        for entry in status["logs"] or []
        if (match := _STARTED.search(entry["message"]))
    ]


def test_the_fal_client_is_served_by_both_worker_replicas(
    fal: fal_client.SyncClient, ray_server: LiveServer, loras: dict[str, Path]
) -> None:
    handles = [fal.submit(APP, _body(loras["style"] if i % 2 else None, steps=8)) for i in range(4)]
    results = [handle.get() for handle in handles]
    assert all(len(result["images"]) == 1 and result["images"][0]["width"] == 512 for result in results)
    image = httpx.get(results[0]["images"][0]["url"], timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    ran_on = {_replica(ray_server, handle.request_id)[0][0] for handle in handles}
    assert len(ran_on) == 2, "four requests at once should keep both replicas busy"
    ready = httpx.get(f"{ray_server.url}/ready", timeout=10).json()
    assert ready["ready"] and ready["model"] == "tiny"


def _pids(deployment: str) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"ServeReplica:flux2:{deployment}"], capture_output=True, text=True, check=True
    )
    return [int(pid) for pid in found.stdout.split()]


def test_a_lora_set_goes_back_to_the_replica_that_holds_it(
    fal: fal_client.SyncClient, ray_server: LiveServer, loras: dict[str, Path]
) -> None:
    # Two sets new to both replicas (a set is its files and their scales), sent together: one to each.
    first = {name: fal.submit(APP, _body(loras[name], steps=8, scale=0.55)) for name in ("style", "detail")}
    holder = {}
    for name, handle in first.items():
        handle.get()
        holder[name] = _replica(ray_server, handle.request_id)[0][0]
    assert holder["style"] != holder["detail"]
    # Then one at a time, so both replicas are free each time: only affinity decides where each goes.
    held_before = _held(ray_server)
    for name in ["style", "detail"] * 3:
        handle = fal.submit(APP, _body(loras[name], scale=0.55))
        handle.get()
        assert _replica(ray_server, handle.request_id)[0][0] == holder[name], name
    assert _held(ray_server) == held_before + 6  # each found its LoRAs already parsed in memory
    # Both replicas busy, a queue behind them: a replica that frees up takes the next job it holds the
    # LoRAs of, even four places down the queue.
    blockers = [fal.submit(APP, _body(steps=50)) for _ in range(2)]
    deadline = time.monotonic() + 60
    while not all(_replica(ray_server, blocker.request_id) for blocker in blockers):
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)
    sets = ["style"] * 4 + ["detail"] * 4
    burst = [fal.submit(APP, _body(loras[name], steps=8, scale=0.55)) for name in sets]
    running = [blocker.status() for blocker in blockers]
    assert all(isinstance(status, fal_client.InProgress) for status in running), "the queue came too late"
    on_holder = []
    for name, handle in zip(sets, burst, strict=True):
        handle.get()
        on_holder.append(_replica(ray_server, handle.request_id)[0][0] == holder[name])
    # All but the last may go elsewhere: a replica that frees up with none of its sets waiting takes the
    # next job, rather than leave it waiting for a busy holder.
    assert sum(on_holder) >= len(sets) - 1, on_holder
    # Each job went to the deployment as a Ray Serve request of its own, never as a child of the client
    # request that happened to set it off (a shared id; cancelled with it): they hung at this load.
    calls = _gpu_worker_calls()
    assert len(calls) >= 20 and len(set(calls)) == len(calls)


def _gpu_worker_calls() -> list[str]:
    """The Ray Serve request id of each call the GPU worker replicas answered, from their own logs."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "serve"
    return [
        match[1]
        for log in logs.glob("replica_flux2_gpu-worker_*.log")
        for match in re.finditer(r" (\S+) -- CALL run ", log.read_text())
    ]


def _held(ray_server: LiveServer) -> float:
    metrics = httpx.get(f"{ray_server.url}/metrics", timeout=10).text
    found = re.search(r'^flux2_lora_sets_started_total\{held="true"\} (\S+)$', metrics, re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_the_js_client_streams_status_through_the_ray_ingress(ray_server: LiveServer) -> None:
    if not node_available():
        pytest.skip("Node.js packages for tests/js are not installed (run scripts/setup)")
    run = subprocess.run(
        ["node", str(JS_DIR / "fal_client_compat.mjs"), "stream"],
        env={**os.environ, "FAL_SERVER_URL": ray_server.url},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"


def test_cancel_reaches_the_replica_running_the_request(
    fal: fal_client.SyncClient, ray_server: LiveServer
) -> None:
    handle = fal.submit(APP, _body(steps=50))
    deadline = time.monotonic() + 60
    while not any("step" in entry["message"] for entry in handle.status(with_logs=True).logs or []):
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.1)
    handle.cancel()
    with pytest.raises(fal_client.client.FalClientHTTPError) as failure:
        handle.get()
    assert failure.value.status_code == 400 and failure.value.error_type == "request_cancelled"
    steps = [
        entry["message"] for entry in handle.status(with_logs=True).logs or [] if "step" in entry["message"]
    ]
    assert steps[-1] != "step 50/50"
    after = fal.run(APP, _body())  # the replica is free again
    assert len(after["images"]) == 1


def _answer(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """An answer from an ingress, through the seconds after a replica died (Ray's proxy may still pick it,
    or wait for the new dispatcher)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            response = httpx.request(method, url, timeout=10, **kwargs)
            if response.status_code < 500:
                return response
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{method} {url} never answered"
        time.sleep(0.2)


def test_a_killed_ingress_or_dispatcher_loses_nothing_accepted(
    ray_server: LiveServer, store_url: str
) -> None:
    queue = f"{ray_server.url}/queue/{APP}"
    accepted = [httpx.post(queue, json=_body(steps=30), timeout=30).json() for _ in range(4)]
    os.kill(_pids("ingress")[0], signal.SIGKILL)  # the other answers meanwhile; it held nothing
    accepted += [_answer("POST", queue, json=_body(steps=30)).json() for _ in range(2)]
    os.kill(_pids("dispatcher")[0], signal.SIGKILL)  # Ray Serve starts another, which recovers
    for request in accepted:
        deadline = time.monotonic() + 120
        while _answer("GET", request["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline, f"{request['request_id']} never completed"
            time.sleep(0.2)
        result = _answer("GET", request["response_url"])
        assert result.status_code == 200 and len(result.json()["images"]) == 1
    logs = [
        entry["message"]
        for request in accepted
        for entry in _answer("GET", request["status_url"], params={"logs": 1}).json()["logs"]
    ]
    assert "requeued after a server restart" in logs  # the new dispatcher took them back from the store
    with job_store(store_url) as store:
        ids = store.request_ids()
    assert all(ids.count(request["request_id"]) == 1 for request in accepted)


def test_a_postgresql_restart_mid_run_refuses_and_loses_nothing(
    ray_server: LiveServer, postgres: PostgresServer, store_url: str
) -> None:
    queue = f"{ray_server.url}/queue/{APP}"
    before = [httpx.post(queue, json=_body(steps=12), timeout=30).json() for _ in range(3)]
    restart = threading.Thread(target=postgres.restart, kwargs={"down_seconds": 2.0})
    restart.start()
    time.sleep(0.5)  # the database is going down or down: these wait for it rather than fail
    during = [httpx.post(queue, json=_body(), timeout=60) for _ in range(3)]
    restart.join()
    assert [answer.status_code for answer in during] == [200, 200, 200]
    submitted = before + [answer.json() for answer in during]
    for request in submitted:
        deadline = time.monotonic() + 60
        while httpx.get(request["status_url"], timeout=30).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(request["response_url"], timeout=30).status_code == 200
    with job_store(store_url) as store:
        ids = store.request_ids()
    assert all(ids.count(request["request_id"]) == 1 for request in submitted)


def test_a_request_whose_replica_is_killed_runs_again_on_another(
    fal: fal_client.SyncClient, ray_server: LiveServer
) -> None:
    handle = fal.submit(APP, _body(steps=40))
    deadline = time.monotonic() + 60
    while not (started := _replica(ray_server, handle.request_id)):
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.1)
    os.kill(started[0][1], signal.SIGKILL)
    result = handle.get()
    assert len(result["images"]) == 1
    runs = _replica(ray_server, handle.request_id)
    assert len(runs) == 2 and runs[0][1] != runs[1][1], runs
    logs = [entry["message"] for entry in handle.status(with_logs=True).logs or []]
    assert any("was lost; running it again on another" in message for message in logs)


@pytest.mark.slow
def test_a_model_that_cannot_load_stops_the_start_saying_why(tmp_path: Path, cache_dir: Path) -> None:
    env = {
        **os.environ,
        "FLUX2_CACHE_DIR": str(cache_dir),
        "FLUX2_RAY_GPUS_PER_WORKER": "0",
        "FLUX2_MEMORY_PROFILE": "nope",
        "FLUX2_PORT": str(free_port()),
    }
    run = subprocess.run(
        [installed_command(), "serve", "--ray", "--model", "tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 2
    assert "model 'tiny' has no memory profile 'nope'" in run.stderr  # the replica's own error
    assert run.stderr.splitlines()[-1].startswith(
        "flux2-server: the Ray Serve application could not be deployed"
    )


def test_a_stop_signal_lets_the_running_jobs_finish_and_keeps_the_queued_one(
    ray_server: LiveServer, store_url: str
) -> None:
    """Last here: it stops the server. The dispatcher drains before the GPU workers go."""
    queue = f"{ray_server.url}/queue/{APP}"
    # Accepted with both slots free, the first two are handed out at once; the third waits for one.
    running = [httpx.post(queue, json=_body(steps=50), timeout=30).json() for _ in range(2)]
    waiting = httpx.post(queue, json=_body(), timeout=30).json()
    ray_server.process.send_signal(signal.SIGTERM)
    assert ray_server.process.wait(120) == 0
    with job_store(store_url) as store:
        finished = [store.load(request["request_id"]) for request in running]
        kept = store.load(waiting["request_id"])
    assert all(record is not None and record.done and record.outcome.ok for record in finished)  # type: ignore[union-attr]
    assert kept is not None and kept.status is JobStatus.IN_QUEUE  # for the next start
