"""scripts/bench_history.py, reduced: it fills a store, measures both servers, and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reduced_run_reports_both_stores(tmp_path: Path) -> None:
    out = tmp_path / "history.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_history.py"), "-n", "5000", "--reads", "20"]
    done = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n"] == 5000
    for store in ("empty", "full"):
        figures = result[store]
        assert figures["ready_seconds"] > 0 and figures["rss_bytes"] > 10 * 1024**2, store
        assert figures["status_read_ms"] > 0, store
    assert set(result["ratios"]) == {"ready_seconds", "rss_bytes"}
    assert "resident MiB" in done.stdout and "status read ms" in done.stdout
