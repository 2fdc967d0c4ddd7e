"""Retained history costs no memory: a server over a job store holding N finished requests, side by side
with one over an empty store, in one run.

Fills a store with N completed requests (as a week of retention leaves them: request, parameters, logs,
an image each, and its file's row), then starts a live server (tiny model) on it and on an empty store.
Prints, for each: seconds until /ready answers 200, the HTTP process's resident memory once ready, and the
median time of a status read of a finished request (an old one for the full store); then the ratios.
Targets: time to ready and memory within 1.5x of the empty store's, a status read under 10 ms.

    .venv/bin/python scripts/bench_history.py [-n 1000000] [--reads 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

from server.config import Settings
from server.store.database import Database, sqlite_url
from server.testing import LiveServer

BATCH = 20_000
APP = "fal-ai/flux-2/lora"


PROMPT = "a lighthouse at dusk, oil on canvas"
BODY = {"prompt": PROMPT, "image_size": "square", "num_inference_steps": 28}
PARAMS = {
    "prompt": PROMPT,
    "width": 512,
    "height": 512,
    "num_inference_steps": 28,
    "guidance_scale": 2.5,
    "seed": 7,
    "num_images": 1,
    "output_format": "png",
    "acceleration": "regular",
    "enable_safety_checker": True,
    "enable_prompt_expansion": False,
}
STAMP = "2026-12-01T00:00:00.000000Z"
LOGS = [
    {"message": message, "level": "INFO", "source": "user", "timestamp": STAMP}
    for message in ["generation started", *(f"step {i}/28" for i in range(1, 29))]
]
JOBS = sa.table(
    "jobs",
    *(sa.column(name, sa.Text) for name in ("request_id", "app_id", "request_input", "base_url", "params")),
    *(sa.column(name, sa.Text) for name in ("loras", "status", "logs", "outcome")),
    *(sa.column(name, sa.Float) for name in ("created_at", "started_at", "finished_at", "inference_seconds")),
    sa.column("priority", sa.Integer),
    sa.column("webhook_pending", sa.Boolean),
)
FILES = sa.table(
    "files", sa.column("name", sa.Text), sa.column("owner", sa.Text), sa.column("created_at", sa.Float)
)


def finished_request(now: float) -> tuple[dict[str, object], dict[str, object]]:
    """One completed request's row, as the server writes it, and its image's row."""
    name = f"{uuid.uuid4().hex}.png"
    image = {"url": f"http://127.0.0.1/files/{name}", "content_type": "image/png", "file_name": name}
    output = {"images": [image], "timings": {"inference": 5.1}, "seed": 7, "has_nsfw_concepts": [False]}
    outcome = {"status_code": 200, "body": {**output, "prompt": PROMPT}, "error": None, "error_type": None}
    row = {
        "request_id": str(uuid.uuid4()),
        "app_id": APP,
        "request_input": json.dumps(BODY),
        "base_url": "http://127.0.0.1/",
        "params": json.dumps(PARAMS),
        "loras": "[]",
        "status": "COMPLETED",
        "logs": json.dumps(LOGS),
        "outcome": json.dumps({**outcome, "headers": {}}),
        "created_at": now - 60,
        "started_at": now - 50,
        "finished_at": now - 45,
        "inference_seconds": 5.1,
        "priority": 0,
        "webhook_pending": False,
    }
    return row, {"name": name, "owner": None, "created_at": now - 45}


def fill(data_dir: Path, n: int) -> list[str]:
    """N completed requests written straight into a migrated store; returns their ids."""
    database = Database(sqlite_url(data_dir / "jobs.sqlite"))
    database.migrate()
    ids: list[str] = []
    now = time.time()
    with database.engine.begin() as connection:
        for start in range(0, n, BATCH):
            rows, file_rows = zip(*(finished_request(now) for _ in range(min(BATCH, n - start))), strict=True)
            connection.execute(JOBS.insert(), list(rows))
            connection.execute(FILES.insert(), list(file_rows))
            ids.extend(str(row["request_id"]) for row in rows)
    database.close()
    return ids


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(data_dir: Path, old_ids: list[str], reads: int) -> dict[str, float]:
    env = {"FLUX2_CACHE_DIR": str(Settings.load().cache_dir)}
    started = time.monotonic()
    server = LiveServer(data_dir, "--model", "tiny", env=env)
    try:
        server.wait_ready()
        ready_seconds = time.monotonic() - started
        rss = resident_bytes(server.process.pid)
        if not old_ids:  # an empty store: read a request of its own, once it has finished
            quick = {"prompt": "p", "image_size": "square", "num_inference_steps": 4}
            accepted = httpx.post(f"{server.url}/queue/{APP}", json=quick).json()
            while httpx.get(accepted["status_url"]).json()["status"] != "COMPLETED":
                time.sleep(0.05)
            old_ids = [accepted["request_id"]]
        samples = []
        with httpx.Client() as client:
            for _ in range(reads):
                url = f"{server.url}/queue/fal-ai/flux-2/requests/{random.choice(old_ids)}/status"
                begin = time.perf_counter()
                assert client.get(url).json()["status"] == "COMPLETED"
                samples.append(time.perf_counter() - begin)
    finally:
        server.stop()
    return {
        "ready_seconds": ready_seconds,
        "rss_bytes": rss,
        "status_read_ms": statistics.median(samples) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1_000_000, help="finished requests in the full store")
    parser.add_argument("--reads", type=int, default=200, help="status reads to time")
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        empty_dir, full_dir = Path(folder) / "empty", Path(folder) / "full"
        empty_dir.mkdir()
        full_dir.mkdir()
        began = time.monotonic()
        ids = fill(full_dir, args.n)
        fill_seconds = time.monotonic() - began
        store_bytes = (full_dir / "jobs.sqlite").stat().st_size
        empty = measure(empty_dir, [], args.reads)
        full = measure(full_dir, ids, args.reads)
    ratios = {key: full[key] / empty[key] for key in ("ready_seconds", "rss_bytes")}
    mib = 1024**2
    size = f"{store_bytes / mib:.0f} MiB, filled in {fill_seconds:.0f} s"
    print(f"{args.n} finished requests in the full store ({size})")
    print(f"{'':24} {'empty store':>12} {'full store':>12} {'ratio':>7}")
    for label, key, scale in (("seconds to ready", "ready_seconds", 1), ("resident MiB", "rss_bytes", mib)):
        print(f"{label:24} {empty[key] / scale:12.2f} {full[key] / scale:12.2f} {ratios[key]:7.2f}")
    print(f"{'status read ms (median)':24} {empty['status_read_ms']:12.2f} {full['status_read_ms']:12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "empty": empty, "full": full, "ratios": ratios}))


if __name__ == "__main__":
    main()
