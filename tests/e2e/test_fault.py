"""`kill -9` while 20 requests are queued or running: after a restart all 20 complete, none twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from fault_kill9 import run


@pytest.mark.timeout(600)
def test_kill_9_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = run(n=20, kill_after=3, data_dir=tmp_path)
    assert report.completed_before_kill < 20  # the kill really hit unfinished work
    assert (report.completed, report.failed, report.lost, report.duplicated) == (20, 0, 0, 0)
