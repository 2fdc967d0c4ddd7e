"""The real `@fal-ai/client` (npm, pinned) against a live server: `tests/js/fal_client_compat.mjs`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from server.testing import LiveServer
from tests.node import JS_DIR, node_available

SCENARIOS = ["subscribe", "stream", "queue", "run", "validation", "cancel", "upload", "proxy"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_js_client(live_server: LiveServer, scenario: str) -> None:
    if not node_available():
        pytest.skip("Node.js packages for tests/js are not installed (run scripts/setup)")
    run = subprocess.run(
        ["node", str(JS_DIR / "fal_client_compat.mjs"), scenario],
        env={**os.environ, "FAL_SERVER_URL": live_server.url},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"] is True
