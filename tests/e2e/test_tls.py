"""Zero-code fal clients: an unmodified fal_client script, given only `flux2-server env`'s variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.testing import LiveServer, installed_command

SCRIPT = """
import fal_client

result = fal_client.subscribe(
    "fal-ai/flux-2/lora",
    arguments={"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4},
)
print(result["images"][0]["url"])
"""


def flux2_env(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [installed_command(), "env", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_unmodified_fal_client_script_over_https(tmp_path: Path, cache_dir: Path) -> None:
    with LiveServer(
        tmp_path / "data", "--model", "tiny", env={"FLUX2_CACHE_DIR": str(cache_dir)}, tls=True
    ) as server:
        printed = flux2_env(
            "--tls", "--port", str(server.port), "--data-dir", str(server.data_dir), cwd=tmp_path
        )
        assert printed.returncode == 0, printed.stderr
        variables = dict(
            line.removeprefix("export ").split("#")[0].strip().split("=", 1)
            for line in printed.stdout.splitlines()
            if not line.startswith("export FAL_KEY")
        )
        assert set(variables) == {"FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"}
        clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FAL_KEY": "local", **variables}
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=clean, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().startswith(f"https://localhost:{server.port}/files/")


def test_env_needs_tls(tmp_path: Path) -> None:
    printed = flux2_env("--data-dir", str(tmp_path), cwd=tmp_path)
    assert printed.returncode == 2
    assert "--tls" in printed.stderr
