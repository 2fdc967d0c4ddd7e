"""A restart with a warm compile cache against a cold start, side by side in one run: `flux2-server serve`
with compiled blocks (FLUX2_COMPILE=true) started in turn with an empty cache folder, again with the folder
the first start filled, and once more with it, each timed from the process start to `/ready` answering
200. The model's own files are shared by all starts (built once before the first), so only the compiled
code differs. On the tiny model on a CPU; on a GPU, `scripts/gpu_check` measures the real model.

    .venv/bin/python scripts/bench_restart.py [--starts 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from pipeline.tiny import ensure_tiny_pipeline
from server.config import Settings
from server.testing import LiveServer


def start_to_ready(data_dir: Path, cache_dir: Path) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    # No TORCHINDUCTOR_CACHE_DIR of our own: the worker then keeps compiled code under the cache folder.
    env = {"FLUX2_COMPILE": "true", "FLUX2_CACHE_DIR": str(cache_dir)}
    with LiveServer(data_dir, "--model", "tiny", env=env) as server:
        seconds = time.perf_counter() - started
        body = httpx.get(f"{server.url}/ready").json()
    return seconds, body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--starts", type=int, default=3, help="warm starts after the cold one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as scratch:
        root = Path(scratch)
        cache_dir = root / "cache"
        # The model is built before timing and shared: only the compile cache is cold or warm.
        (cache_dir / "tiny").mkdir(parents=True)
        shared = ensure_tiny_pipeline(Settings.load().cache_dir / "tiny")
        (cache_dir / "tiny" / shared.name).symlink_to(shared)
        rows = []
        for start in range(1 + args.starts):
            seconds, body = start_to_ready(root / f"data{start}", cache_dir)
            rows.append((seconds, body["compile_seconds"], body["compiled_graphs_reused"]))
            label = "cold" if start == 0 else f"warm {start}"
            print(
                f"{label:8} start to /ready {seconds:6.1f} s  compiling {body['compile_seconds']:6.1f} s"
                f"  graphs from the cache {body['compiled_graphs_reused']}"
            )
        cold = rows[0][0]
        warm = statistics.median(row[0] for row in rows[1:])
        print(f"warm / cold start to /ready: {warm:.1f} s / {cold:.1f} s = {warm / cold:.2f}x")


if __name__ == "__main__":
    main()
