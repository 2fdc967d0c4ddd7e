"""`kill -9` while 12 requests are queued or running: after a restart all 12 complete, none twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.timeout(600)
def test_kill_9_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [
        sys.executable,
        str(SCRIPTS / "fault_kill9.py"),
        "-n",
        "12",
        "--kill-after",
        "3",
        "--json",
        str(out),
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert out.exists(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["completed_before_kill"] < 12  # the kill really hit unfinished work
    assert (report["completed"], report["failed"], report["lost"], report["duplicated"]) == (12, 0, 0, 0)
    assert run.returncode == 0
