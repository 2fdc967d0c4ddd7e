"""scripts/bench_scaleout.py, reduced: its three configurations at both loads measured and reported, every
request counted once as held or read, and, one request at a time, routing by LoRA set finding LoRAs in
memory at least as often as Ray Serve's default routing (which can at best equal it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_scaleout.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_scaleout_figures(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT), "--requests", "12", "--loras", "4", "--json", str(out)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=840)
    assert out.exists(), run.stdout[-5000:] + run.stderr[-5000:]
    rows = {(row["config"], row["concurrency"]): row for row in json.loads(out.read_text())}
    configs = ["1 replica", "2 replicas, by LoRA set", "2 replicas, Ray's default routing"]
    assert list(rows) == [(config, concurrency) for config in configs for concurrency in (1, 4)]
    for row in rows.values():
        assert row["held"] + row["read"] == row["requests"] == 12 and row["throughput"] > 0
        assert 0 < row["p50"] <= row["p95"]
    # One at a time, both replicas are free: by LoRA set, a request goes where its LoRA is.
    assert rows[(configs[1], 1)]["held"] >= rows[(configs[2], 1)]["held"]
    assert "| 2 replicas, by LoRA set | 1 |" in run.stdout and run.returncode == 0
