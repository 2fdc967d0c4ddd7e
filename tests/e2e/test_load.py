"""A bounded load run: 60 submits from 12 concurrent clients, none lost, failed or duplicated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from load_submit import run


@pytest.mark.timeout(600)
def test_concurrent_submits_lose_nothing(tmp_path: Path) -> None:
    report = run(n=60, clients=12, data_dir=tmp_path)
    assert (report.submitted, report.completed, report.failed, report.lost, report.duplicated) == (
        60,
        60,
        0,
        0,
        0,
    )
