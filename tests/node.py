"""Whether the `@fal-ai/client` tests can run: Node.js and the npm packages under tests/js."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"


def node_available() -> bool:
    """Whether the JS client tests can run; in CI they must."""
    if (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        return True
    if os.environ.get("CI"):
        pytest.fail("CI must run the JS client tests: scripts/setup installs tests/js with npm")
    return False
