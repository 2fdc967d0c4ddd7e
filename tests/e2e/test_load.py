"""A bounded load run: 60 submits from 12 concurrent clients, none lost, failed or duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_submits_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, str(SCRIPTS / "load_submit.py"), "-n", "60", "-c", "12", "--json", str(out)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert out.exists(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert (
        report["submitted"],
        report["completed"],
        report["failed"],
        report["lost"],
        report["duplicated"],
    ) == (
        60,
        60,
        0,
        0,
        0,
    )
    assert run.returncode == 0
