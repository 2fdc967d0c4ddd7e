"""Faults that stall rather than crash, each against a live server (tiny model): how long until it served
again, and whether any accepted request was lost or answered twice.

1. hung worker mid-request: the worker is stopped (SIGSTOP) during a generation, a request queued behind;
2. hung worker at load: the worker is stopped while it loads the model; then the operator restarts;
3. slow-drip downloads: N requests whose LoRA URLs send a byte every 2 s, spread over many hosts, while
   ordinary requests go on;
4. SIGTERM mid-generation: one generation running, two queued; the server is started again;
5. disk full: the data folder on a small filesystem, filled up, then freed (needs root to mount it).

Prints one row per fault: seconds until it served again (from the fault), requests accepted, lost (not
completed), and answered twice (more than one stored record per id, or ids never handed out).

    .venv/bin/python scripts/fault_stall.py [--bounded] [--drips 200] [--faults 1,3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from server.config import Settings
from server.jobs import JobStatus
from server.testing import LiveServer, lost_and_duplicated, stored_statuses

LONG = {"prompt": "a lighthouse", "image_size": "square_hd", "num_inference_steps": 50}  # ~5 s on tiny
SHORT = {"prompt": "a harbour", "image_size": "square", "num_inference_steps": 4}


@dataclass
class FaultResult:
    fault: str
    served_again_seconds: float | None  # None: it never did
    accepted: int
    lost: int
    duplicated: int
    notes: str


@dataclass(frozen=True)
class Limits:
    heartbeat: float
    startup: float
    rate_window: float
    drips: int


class Scenario:
    """A data folder, the live servers started on it, and the requests they accepted."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.data = root / name / "data"
        self.env = {"FLUX2_CACHE_DIR": str(Settings.load().cache_dir), **env}
        self.ids: list[str] = []
        self.port: int | None = None

    def server(self, wait: bool = True) -> LiveServer:
        server = LiveServer(self.data, "--model", "tiny", env=self.env, port=self.port)
        self.port = server.port
        if wait:
            server.wait_ready()
        return server

    def submit(self, server: LiveServer, body: dict[str, Any]) -> httpx.Response:
        answer = httpx.post(f"{server.url}/queue/fal-ai/flux-2/lora", json=body, timeout=30)
        if answer.status_code == 200:
            self.ids.append(answer.json()["request_id"])
        return answer

    def status(self, server: LiveServer, request_id: str) -> str:
        url = f"{server.url}/queue/fal-ai/flux-2/requests/{request_id}/status"
        return str(httpx.get(url, timeout=30).json()["status"])

    def result(self, server: LiveServer, request_id: str, timeout: float = 120) -> httpx.Response:
        until(lambda: self.status(server, request_id) == "COMPLETED", timeout)
        return httpx.get(f"{server.url}/queue/fal-ai/flux-2/requests/{request_id}", timeout=30)

    def counts(self, server: LiveServer) -> tuple[int, int]:
        """Lost (not completed, asked of the running server) and answered twice (from its store)."""
        lost = sum(self.status(server, rid) != "COMPLETED" for rid in self.ids)
        _, duplicated = lost_and_duplicated(self.data, len(self.ids), self.ids)
        return lost, duplicated


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held; raises after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def ready(server: LiveServer) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{server.url}/ready", timeout=10).json()
    return answer


def stepping(scenario: Scenario, server: LiveServer, request_id: str) -> bool:
    url = f"{server.url}/queue/fal-ai/flux-2/requests/{request_id}/status"
    logs = httpx.get(url, params={"logs": 1}, timeout=30).json()["logs"] or []
    return any(entry["message"].startswith("step ") for entry in logs)


def hung_mid_request(root: Path, limits: Limits) -> FaultResult:
    scenario = Scenario(root, "hung-mid-request", {"FLUX2_HEARTBEAT_SECONDS": str(limits.heartbeat)})
    with scenario.server() as server:
        pid = ready(server)["worker_pid"]
        hung = scenario.submit(server, LONG).json()["request_id"]
        until(lambda: stepping(scenario, server, hung), 60)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        behind = scenario.submit(server, SHORT).json()["request_id"]
        answer = scenario.result(server, hung)
        until(lambda: ready(server)["ready"] and ready(server)["worker_pid"] != pid, 120)
        served_again = time.monotonic() - stopped
        behind_code = scenario.result(server, behind).status_code
        lost, duplicated = scenario.counts(server)
    notes = (
        f"the hung request got {answer.status_code} {answer.json().get('error_type')}, "
        f"the one queued behind it {behind_code}"
    )
    return FaultResult("hung worker mid-request", served_again, len(scenario.ids), lost, duplicated, notes)


def worker_pid_of(server: LiveServer) -> int | None:
    """The server's worker process (a multiprocessing spawn child), by its parent and command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == server.process.pid and b"spawn_main" in command:
            return int(entry.name)
    return None


def hung_at_load(root: Path, limits: Limits) -> FaultResult:
    scenario = Scenario(root, "hung-at-load", {"FLUX2_STARTUP_TIMEOUT_SECONDS": str(limits.startup)})
    server = scenario.server(wait=False)
    try:
        until(lambda: worker_pid_of(server) is not None, 60)
        pid = worker_pid_of(server)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # in the middle of importing and loading the model
        stopped = time.monotonic()
        until(lambda: _answers(server), 60)
        queued = scenario.submit(server, SHORT).json()["request_id"]
        until(lambda: ready(server)["state"] == "failed", 120)
        detected = time.monotonic() - stopped
        refused = scenario.result(server, queued)
        reason = ready(server)["error"]
    finally:
        server.stop()
    with scenario.server() as again:  # the operator starts it again
        served_again = time.monotonic() - stopped
        lost, duplicated = scenario.counts(again)
    notes = (
        f"reported failed after {detected:.1f} s ({reason}); the request waiting then got "
        f"{refused.status_code} {refused.json().get('error_type')}; served again after a restart"
    )
    return FaultResult("hung worker at load", served_again, len(scenario.ids), lost, duplicated, notes)


def _answers(server: LiveServer) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def dripping_server() -> Iterator[int]:
    """An HTTP server on every loopback address that sends a byte every 2 s, forever."""

    class Drip(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(2)
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("0.0.0.0", 0), Drip)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def slow_drips(root: Path, limits: Limits) -> FaultResult:
    env = {
        "FLUX2_ALLOW_PRIVATE_LORA_URLS": "true",
        "FLUX2_DOWNLOAD_RATE_WINDOW_SECONDS": str(limits.rate_window),
        "FLUX2_DOWNLOADS_MAX": "64",
    }
    scenario = Scenario(root, "slow-drips", env)
    with dripping_server() as port, scenario.server() as server:
        began = time.monotonic()
        drips = [
            scenario.submit(
                server,
                {**SHORT, "loras": [{"path": f"http://127.0.0.{2 + i % 50}:{port}/lora-{i}.safetensors"}]},
            ).json()["request_id"]
            for i in range(limits.drips)
        ]
        ordinary = [scenario.submit(server, SHORT).json()["request_id"] for _ in range(3)]
        served = [scenario.result(server, rid).status_code for rid in ordinary]
        ordinary_seconds = time.monotonic() - began
        answers = [scenario.result(server, rid, timeout=600) for rid in drips]
        resolved = time.monotonic() - began
        refused = sum(a.status_code == 422 and "under the minimum" in a.text for a in answers)
        lost, duplicated = scenario.counts(server)
    notes = (
        f"{refused} of {len(drips)} drips refused (422 at loras.0.path) within {resolved:.0f} s; "
        f"ordinary requests served meanwhile in {ordinary_seconds:.1f} s ({served.count(200)} of 3)"
    )
    return FaultResult(f"slow-drip downloads x{len(drips)}", 0.0, len(scenario.ids), lost, duplicated, notes)


def sigterm_mid_generation(root: Path, limits: Limits) -> FaultResult:
    scenario = Scenario(root, "sigterm", {"FLUX2_SHUTDOWN_GRACE_SECONDS": "60"})
    server = scenario.server()
    running = scenario.submit(server, LONG).json()["request_id"]
    for _ in range(2):
        scenario.submit(server, SHORT)
    until(lambda: stepping(scenario, server, running), 60)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = server.process.wait(120)
    stopped_after = time.monotonic() - signalled
    server.stop()
    finished_first = stored_statuses(scenario.data, [running]) == [JobStatus.COMPLETED]
    with scenario.server() as again:
        served_again = time.monotonic() - signalled
        answers = [scenario.result(again, rid).status_code for rid in scenario.ids]
        lost, duplicated = scenario.counts(again)
    traceback = "Traceback" in again.log()
    notes = (
        f"exited after {stopped_after:.1f} s (status {code}); the running generation finished and was "
        f"stored first: {finished_first}; "
        f"after the restart: {answers.count(200)} of {len(answers)} 200; traceback in the log: {traceback}"
    )
    return FaultResult("SIGTERM mid-generation", served_again, len(scenario.ids), lost, duplicated, notes)


def disk_full(root: Path, limits: Limits) -> FaultResult:
    disk = root / "disk-full" / "disk"
    disk.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        return FaultResult("disk full", None, 0, 0, 0, "skipped: cannot mount a small filesystem here")
    try:
        scenario = Scenario(disk, "server", {})
        with scenario.server() as server:
            scenario.result(server, scenario.submit(server, SHORT).json()["request_id"])
            filler = disk / "filler"
            with filler.open("wb") as out:
                try:
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
                        os.fsync(out.fileno())
                except OSError:
                    pass
            codes = []
            for _ in range(3):
                answer = scenario.submit(server, SHORT)
                if answer.status_code == 200:
                    answer = scenario.result(server, answer.json()["request_id"])
                codes.append(answer.status_code)
            healthy = httpx.get(f"{server.url}/health").status_code == 200
            filler.unlink()
            freed = time.monotonic()
            until(lambda: _served(scenario, server), 60)
            served_again = time.monotonic() - freed
            lost, duplicated = scenario.counts(server)
        notes = (
            f"while full: {codes} (507 expected), /health 200: {healthy}; served again once space returned"
        )
        return FaultResult("disk full", served_again, len(scenario.ids), lost, duplicated, notes)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _served(scenario: Scenario, server: LiveServer) -> bool:
    answer = scenario.submit(server, SHORT)
    return (
        answer.status_code == 200 and scenario.result(server, answer.json()["request_id"]).status_code == 200
    )


FAULTS = [hung_mid_request, hung_at_load, slow_drips, sigterm_mid_generation, disk_full]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bounded", action="store_true", help="short deadlines and 20 drips, for the test suite"
    )
    parser.add_argument("--drips", type=int, help="slow-drip downloads (default 200; 20 bounded)")
    parser.add_argument("--faults", help="only these, by number above (e.g. 1,2,3); default all")
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    args = parser.parse_args()
    chosen = [FAULTS[int(n) - 1] for n in args.faults.split(",")] if args.faults else FAULTS
    limits = (
        Limits(heartbeat=3, startup=30, rate_window=2, drips=args.drips or 20)
        if args.bounded
        else Limits(heartbeat=10, startup=60, rate_window=5, drips=args.drips or 200)
    )
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for fault in chosen:
            results.append(fault(Path(folder), limits))
            print(f"done: {results[-1].fault}", flush=True)
    print(f"\n| fault | served again after | accepted | lost | answered twice | notes |\n|{'---|' * 6}")
    for r in results:
        again = "never" if r.served_again_seconds is None else f"{r.served_again_seconds:.1f} s"
        print(f"| {r.fault} | {again} | {r.accepted} | {r.lost} | {r.duplicated} | {r.notes} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
