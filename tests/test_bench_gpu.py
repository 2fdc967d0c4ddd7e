"""scripts/bench_gpu.py end to end in its reduced CPU mode: it runs, and reports every number it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["measurement", "result", "vs none", "blocks run", "peak memory"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_reduced_run_measures_every_preset_compile_and_lora_switch(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--reduced", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "reduced"
    steps = result["steps"]

    presets = result["presets"]
    assert list(presets) == ["none", "regular", "high"]
    for name, numbers in presets.items():
        assert math.isfinite(numbers["seconds_per_step"]) and numbers["seconds_per_step"] > 0, name
        assert numbers["runs_seconds"] and all(seconds > 0 for seconds in numbers["runs_seconds"]), name
        assert numbers["finite"], name  # the fed-back latents stayed finite: real arithmetic was timed
    # Every step ran the blocks without the step cache; with it, some steps were predicted instead.
    assert presets["none"]["blocks_run"] == presets["regular"]["blocks_run"] == [steps] * result["repeats"]
    (high,) = set(presets["high"]["blocks_run"])  # the same count every run
    assert 0 < high < steps

    assert result["compile_seconds"] > 0
    assert result["compiled_graphs"] >= 2  # a double-block graph and a single-block one: really compiled
    assert result["graphs_after_presets"] == result["compiled_graphs"]  # no preset or LoRA switch recompiled

    switches = result["lora_switch_seconds"]
    assert list(switches) == ["empty -> A", "A -> B", "B -> empty"]
    for name, times in switches.items():
        assert times["median"] > 0 and all(seconds > 0 for seconds in times["samples"]), name

    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")] for line in done.stdout.splitlines()
    ]
    assert HEADER in rows
    names = {row[0] for row in rows if len(row) == len(HEADER)}
    assert {"`none`: s/step", "`regular`: s/step", "`high`: s/step"} <= names
