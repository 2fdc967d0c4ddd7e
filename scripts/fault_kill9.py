"""Fault test: `kill -9` the server while requests are queued and running, restart it, count the damage.

Submits N queue requests to a live server (tiny model), kills it with SIGKILL once K have completed,
starts it again on the same data folder and port, and waits for every request. Prints how many completed,
failed, were lost or duplicated; all but "completed" must be 0.

    .venv/bin/python scripts/fault_kill9.py [-n 20] [--kill-after 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
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
class FaultReport:
    submitted: int
    completed_before_kill: int
    completed: int
    failed: int
    lost: int
    duplicated: int
    recovery_seconds: float


def run(n: int, kill_after: int, data_dir: Path) -> FaultReport:
    env = {"FLUX2_CACHE_DIR": str(Settings.load().cache_dir)}
    server = LiveServer(data_dir, "--model", "tiny", env=env)
    server.wait_ready()
    base = f"{server.url}/queue/fal-ai/flux-2"
    ids = [
        httpx.post(f"{server.url}/queue/fal-ai/flux-2/lora", json={**BODY, "seed": i}).json()["request_id"]
        for i in range(n)
    ]

    def finished() -> list[str]:
        return [
            rid for rid in ids if httpx.get(f"{base}/requests/{rid}/status").json()["status"] == "COMPLETED"
        ]

    while len(done := finished()) < kill_after:
        time.sleep(0.05)
    server.kill()

    restarted = LiveServer(data_dir, "--model", "tiny", env=env, port=server.port)
    started = time.monotonic()
    try:
        restarted.wait_ready()
        while len(finished()) < n and time.monotonic() - started < 300:
            time.sleep(0.1)
        recovery = time.monotonic() - started
        results = [httpx.get(f"{base}/requests/{rid}") for rid in ids]
    finally:
        restarted.stop()
    completed = sum(r.status_code == 200 and len(r.json()["images"]) == 1 for r in results)
    lost, duplicated = lost_and_duplicated(data_dir, n, ids)
    return FaultReport(
        submitted=n,
        completed_before_kill=len(done),
        completed=completed,
        failed=sum(r.status_code != 200 for r in results),
        lost=lost,
        duplicated=duplicated,
        recovery_seconds=recovery,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--kill-after", type=int, default=5, help="completed requests before the kill")
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        report = run(args.n, args.kill_after, Path(data_dir))
    for field, value in vars(report).items():
        print(f"{field:22} {value:.1f}" if isinstance(value, float) else f"{field:22} {value}")
    if args.json:
        args.json.write_text(json.dumps(vars(report)))
    sys.exit(0 if report.completed == report.submitted else 1)


if __name__ == "__main__":
    main()
