"""scripts/gpu_check.py in its reduced CPU mode, the way a lent GPU machine runs it (the repository on
PYTHONPATH, nothing installed from it): every request of the check runs through the worker's own code
under the FP8 profile's quantization, and each becomes a BENCHMARKS row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = ["none", "regular", "high"] * 2 + ["edit regular"]


def test_reduced_check_runs_every_request_and_writes_its_rows(tmp_path: Path, cache_dir: Path) -> None:
    results, benchmarks = tmp_path / "check.json", tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--reduced",
            "--profiles",
            "fp8",
            "--json",
            str(results),
            "--benchmarks",
            str(benchmarks),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (fp8,) = json.loads(results.read_text())
    assert fp8["profile"] == "fp8" and fp8["error"] is None
    assert [row["request"] for row in fp8["rows"]] == REQUESTS
    assert [row["loras"] for row in fp8["rows"]] == [0, 0, 0, 3, 3, 3, 0]
    assert all(0 < row["seconds_per_step"] < row["seconds_per_image"] for row in fp8["rows"])
    switches = [row["lora_switch_seconds"] for row in fp8["rows"] if row["loras"]]
    assert all(seconds > 0 for seconds in switches) and fp8["tier_switch_seconds"] > 0
    assert fp8["held_gib"] > 0  # the worker's memory account of the random-weight model
    table = benchmarks.read_text()
    assert table.startswith("# Benchmarks") and "| date | GPU |" in table
    assert table.count("| fp8 (no cap) |") == len(REQUESTS) + 1  # and the switch back
