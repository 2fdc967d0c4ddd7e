"""The line between the HTTP side and the GPU side, as docs/ARCHITECTURE.md draws it, kept by the code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The wire, the entry points into the GPU side, the model registry (read by the CLI to fail fast, handed to
# the worker) and the one log setup both processes share.
SERVER_MAY_IMPORT = {"pipeline.messages", "pipeline.worker", "pipeline.models", "pipeline.logs"}
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn")


def imported(folder: str) -> dict[str, set[str]]:
    """Every absolute module each file of the package imports, at any depth (function bodies included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_server_imports_only_the_wire_and_the_entry_points_of_the_gpu_side() -> None:
    for path, names in imported("server").items():
        reaching = {name for name in names if name == "pipeline" or name.startswith("pipeline.")}
        assert reaching <= SERVER_MAY_IMPORT, f"{path} imports {sorted(reaching - SERVER_MAY_IMPORT)}"


def test_the_gpu_side_never_imports_the_http_side() -> None:
    for path, names in imported("pipeline").items():
        http = {name for name in names if name.split(".")[0] in ("server", *HTTP_LIBRARIES)}
        assert not http, f"{path} imports {sorted(http)}"


def loaded_after(modules: list[str]) -> set[str]:
    """Which heavy libraries a fresh interpreter holds after importing `modules`."""
    watched = ["torch", "diffusers", "transformers", *HTTP_LIBRARIES]
    code = f"import sys, {', '.join(modules)}\nprint(*(m for m in {watched!r} if m in sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(run.stdout.split())


def test_the_http_process_never_loads_torch() -> None:
    assert not loaded_after(["server.app", "server.cli", "server.oneshot", "server.scaleout.application"]) & {
        "torch",
        "diffusers",
        "transformers",
    }


def test_the_value_types_and_the_scheduling_rooms_do_without_the_web_framework() -> None:
    rooms = [
        "server.jobs",
        "server.outcome",
        "server.fetch.stage",
        "server.request_queue",
        "server.supervisor",
        "server.completion",
        "server.scheduler",
        "server.files",
        "server.store.job_store",
    ]
    assert loaded_after(rooms) == set()
