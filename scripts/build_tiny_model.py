"""Build the tiny random-weight FLUX.2 pipeline into a folder, to inspect it or load it by hand.

The server builds it on first use by itself (into FLUX2_CACHE_DIR); this is for looking at it.

    .venv/bin/python scripts/build_tiny_model.py OUT_DIR [--seed 0]
    # then: Flux2Pipeline.from_pretrained(OUT_DIR)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.tiny import build_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_tiny_pipeline(args.out_dir, seed=args.seed)
    print(f"built the tiny FLUX.2 pipeline in {args.out_dir}")


if __name__ == "__main__":
    main()
