"""Load run: many concurrent clients submit to the queue of a live server (tiny model); nothing may be lost.

N submits from C concurrent clients, then every request is followed to its result. Prints the submit
latency (p50, p99), throughput, and the counts of lost, failed and duplicated requests (all must be 0).

    .venv/bin/python scripts/load_submit.py [-n 500] [-c 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.config import Settings
from server.testing import LiveServer, lost_and_duplicated

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


@dataclass
class LoadReport:
    submitted: int
    clients: int
    submit_p50_ms: float
    submit_p99_ms: float
    completed: int
    failed: int
    lost: int
    duplicated: int
    drain_seconds: float


async def _submit_all(url: str, n: int, clients: int) -> tuple[list[str], list[float]]:
    ids: list[str] = []
    latencies: list[float] = []
    next_index = iter(range(n))

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            for index in next_index:
                started = time.perf_counter()
                response = await http.post(f"{url}/queue/fal-ai/flux-2/lora", json={**BODY, "seed": index})
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                ids.append(response.json()["request_id"])

    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, latencies


async def _results(url: str, ids: list[str], deadline: float) -> dict[str, int]:
    codes: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=60) as http:
        for rid in ids:
            base = f"{url}/queue/fal-ai/flux-2/requests/{rid}"
            while (await http.get(f"{base}/status")).status_code == 202 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            codes[rid] = (await http.get(base)).status_code
    return codes


def run(n: int, clients: int, data_dir: Path) -> LoadReport:
    server = LiveServer(data_dir, "--model", "tiny", env={"FLUX2_CACHE_DIR": str(Settings.load().cache_dir)})
    try:
        server.wait_ready()
        started = time.monotonic()
        ids, latencies = asyncio.run(_submit_all(server.url, n, clients))
        codes = asyncio.run(_results(server.url, ids, deadline=time.monotonic() + 60 + n * 2))
        drain = time.monotonic() - started
    finally:
        server.stop()
    lost, duplicated = lost_and_duplicated(data_dir, n, ids)
    quantiles = statistics.quantiles(latencies, n=100)
    return LoadReport(
        submitted=len(ids),
        clients=clients,
        submit_p50_ms=statistics.median(latencies) * 1e3,
        submit_p99_ms=quantiles[98] * 1e3,
        completed=sum(code == 200 for code in codes.values()),
        failed=sum(code != 200 for code in codes.values()),
        lost=lost,
        duplicated=duplicated,
        drain_seconds=drain,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=500, help="submits")
    parser.add_argument("-c", type=int, default=50, help="concurrent clients")
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        report = run(args.n, args.c, Path(data_dir))
    for field, value in vars(report).items():
        print(f"{field:15} {value:.1f}" if isinstance(value, float) else f"{field:15} {value}")
    if args.json:
        args.json.write_text(json.dumps(vars(report)))
    sys.exit(0 if report.completed == report.submitted == args.n else 1)


if __name__ == "__main__":
    main()
