"""The README's client snippets, run as written (only the address changed) against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from server.testing import LiveServer
from tests.node import JS_DIR, node_available

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "http://127.0.0.1:8000"


def snippet(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, f"expected one {language} block in README.md"
    return str(blocks[0])


def test_python_snippet(live_server: LiveServer) -> None:
    code = snippet("python").replace(README_ADDRESS, live_server.url)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith(f"{live_server.url}/files/")
    assert "Completed" in run.stdout


def test_js_snippet(live_server: LiveServer) -> None:
    if not node_available():
        pytest.skip("Node.js packages for tests/js are not installed (run scripts/setup)")
    script = JS_DIR / f".readme-{uuid.uuid4().hex}.mjs"  # inside tests/js so the package resolves
    script.write_text(snippet("js").replace(README_ADDRESS, live_server.url))
    try:
        run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120)
    finally:
        script.unlink()
    assert run.returncode == 0, run.stderr
    assert f"{live_server.url}/files/" in run.stdout.strip().splitlines()[-1]
    assert "COMPLETED" in run.stdout
