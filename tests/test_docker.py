"""The container files (Dockerfile, .dockerignore, compose.yaml) checked against the project, without Docker.

No Docker engine runs where the tests run, so nothing is built and the `docker` client, where it is
installed, is never called: the Dockerfile is parsed here (instructions, continuation lines, exec / JSON
forms, ARG and ENV substitution) and every check compares it with what the project itself says: the
torch pin of scripts/setup and pyproject.toml, the CUDA build of that torch wheel, `Settings()` defaults,
the console script of `[project.scripts]`, the package folders setuptools installs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from server.cli import _parser
from server.config import ENV_PREFIX, Settings
from server.routes import ops
from tests.dockerfile import (
    Stage,
    dockerignore,
    final_stage,
    ignored,
    parse_dockerfile,
    substitute,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the project's files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage() -> Stage:
    return final_stage(parse_dockerfile((ROOT / "Dockerfile").read_text()))


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore((ROOT / ".dockerignore").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert len(document["services"]) == 1, "compose.yaml: one service"
    return document


@pytest.fixture(scope="module")
def compose_service(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = next(iter(compose["services"].values()))
    return service


def setup_pins() -> dict[str, str]:
    """`name==version` pins on scripts/setup's pip install lines (torch, torchvision)."""
    text = (ROOT / "scripts" / "setup").read_text()
    return dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", text))


def installed_torch_cuda() -> str | None:
    """torch.version.cuda of the installed torch, from torch/version.py (importing torch takes seconds)."""
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            value = ast.literal_eval(node.value)
            return value if isinstance(value, str) else None
    raise AssertionError("torch/version.py has no `cuda`")


def copies(stage: Stage) -> list[tuple[str, str]]:
    """(source in the build context, destination in the image) for every COPY / ADD from the context."""
    workdir, pairs = "/", []
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, substitute(instruction.args, stage.variables()))
        if instruction.keyword not in ("COPY", "ADD") or "from" in instruction.flags:
            continue
        words = instruction.exec_form or shlex.split(instruction.args)
        *sources, dest = (substitute(word, stage.variables()) for word in words)
        dest = posixpath.join(workdir, dest)
        for source in sources:
            target = posixpath.join(dest, posixpath.basename(source)) if dest.endswith("/") else dest
            pairs.append((source, posixpath.normpath(target)))
    return pairs


# --- the parser itself -------------------------------------------------------------------------------------


def test_parser_reads_continuations_comments_flags_and_exec_forms() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS build\n"
        "FROM ${BASE}\n"
        "ARG V=1.2\n"
        "env A=1 \\\n"
        "    # a comment inside a continuation\n"
        '    B="two words" \\\n'
        "\n"
        "    C=${V}\n"
        "ENV LEGACY some value\n"
        "RUN echo $A \\\n"
        "    && echo ${MISSING:-fallback}\n"
        "COPY --chown=1000:1000 --from=build /x /y\n"
        'HEALTHCHECK --interval=5s CMD ["python", "-c", "print(1)"]\n'
        'CMD ["serve"]\n'
        "ENTRYPOINT flux2-server\n"
    )
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == [
        *("ARG", "FROM", "FROM", "ARG", "ENV", "ENV", "RUN", "COPY", "HEALTHCHECK", "CMD", "ENTRYPOINT")
    ]
    stage = final_stage(instructions)
    assert stage.base == "python:3.11-slim"
    assert stage.env == {"A": "1", "B": "two words", "C": "1.2", "LEGACY": "some value"}
    assert stage.runs == ["echo 1     && echo fallback"]
    copy = stage.one("COPY")
    assert copy.flags == {"chown": "1000:1000", "from": "build"} and copy.args == "/x /y"
    assert copies(stage) == []  # COPY --from copies from a stage, not from the build context
    health = stage.one("HEALTHCHECK")
    assert health.flags == {"interval": "5s"} and health.args.startswith("CMD [")
    assert stage.one("CMD").exec_form == ["serve"] and stage.one("ENTRYPOINT").exec_form is None


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = dockerignore("*\n!keep/\n**/__pycache__\n*.py[co]\n/data\n")
    assert ignored(rules, "anything") and ignored(rules, "deep/er/file")
    assert not ignored(rules, "keep") and not ignored(rules, "keep/sub/file.py")
    assert ignored(rules, "keep/sub/__pycache__/file.cpython-311.pyc")
    rules = dockerignore("data\n*.py[co]\n")
    assert ignored(rules, "data/jobs.sqlite") and ignored(rules, "x.pyc") and not ignored(rules, "x.py")
    assert not ignored(rules, "server/data")  # a pattern without ** matches from the context's root


# --- torch, CUDA and Python --------------------------------------------------------------------------------


def test_torch_is_the_version_scripts_setup_pins(stage: Stage) -> None:
    pins = setup_pins()
    assert set(pins) == {"torch", "torchvision"}, "scripts/setup no longer pins torch and torchvision"
    assert stage.args.get("TORCH_VERSION") == pins["torch"]
    assert stage.args.get("TORCHVISION_VERSION") == pins["torchvision"]
    installs = [run for run in stage.runs if "pip install" in run and "torch" in run]
    assert installs, "no RUN pip-installs torch"
    for run in installs:  # every install that names torch holds it (and torchvision) at the pin
        assert f'"torch=={pins["torch"]}"' in run and f'"torchvision=={pins["torchvision"]}"' in run, run
    requirements = {r.name: r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
    for name in ("torch", "torchvision"):
        assert Version(pins[name]) in requirements[name].specifier, (
            f"pyproject.toml's {name} excludes the pin"
        )


def test_cuda_version_is_the_one_the_torch_wheel_is_built_for(stage: Stage) -> None:
    pinned = Version(setup_pins()["torch"])
    installed = Version(importlib.metadata.version("torch"))
    if installed.public != pinned.public:
        pytest.skip(f".venv has torch {installed}, scripts/setup pins {pinned}: run scripts/setup")
    cuda = installed_torch_cuda()
    assert cuda, "the installed torch is a CPU build: the pinned PyPI wheel should be a CUDA build"
    assert stage.args.get("TORCH_CUDA") == cuda, f"torch {pinned} is built for CUDA {cuda}"
    assert stage.env.get("NVIDIA_REQUIRE_CUDA") == f"cuda>={cuda}"
    # The wheel's own dependencies bring that CUDA runtime (what pip installs into the image with it).
    runtime = [
        req
        for req in importlib.metadata.requires("torch") or []
        if re.match(r"(cuda-toolkit|nvidia-cuda-runtime)\b", req)
    ]
    assert runtime and all(f"=={cuda}." in req for req in runtime), runtime
    # A CUDA base image must name the same versions; any other base gets CUDA from the torch wheel alone.
    image, _, tag = stage.base.rpartition(":")
    if image.endswith("nvidia/cuda"):
        assert tag.startswith(f"{cuda}."), stage.base
    elif image.endswith("pytorch/pytorch"):
        assert tag.startswith(f"{pinned.public}-cuda{cuda}-"), stage.base
    else:
        assert "cuda" not in tag, stage.base


def test_python_base_satisfies_requires_python(stage: Stage) -> None:
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)[.\w-]*", stage.base)
    if match is None:
        pytest.skip(f"base image {stage.base} is not the official python image")
    assert Version(match.group(1)) in SpecifierSet(PYPROJECT["project"]["requires-python"])


# --- what the server sees in the container -----------------------------------------------------------------


def image_settings(stage: Stage) -> Settings:
    return Settings.load(env={k: v for k, v in stage.env.items() if k.startswith(ENV_PREFIX)})


def test_every_flux2_variable_is_a_setting(stage: Stage) -> None:
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = {k for k in stage.env if k.startswith(ENV_PREFIX)} - names
    assert not unknown, f"Settings ignores these (typo?): {unknown}"


def test_binds_all_interfaces(stage: Stage) -> None:
    assert stage.env.get("FLUX2_HOST") == "0.0.0.0"
    assert image_settings(stage).host == "0.0.0.0"


def test_exposes_the_server_port(stage: Stage) -> None:
    exposed = [port.split("/")[0] for i in stage.all("EXPOSE") for port in i.args.split()]
    assert exposed == [str(image_settings(stage).port)] == [str(Settings().port)]


def test_entrypoint_is_the_console_script_serving(stage: Stage) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert len(scripts) == 1
    ((name, target),) = scripts.items()
    assert target == "server.cli:main"
    assert stage.one("ENTRYPOINT").exec_form == [name]
    assert stage.one("CMD").exec_form == ["serve"]
    assert _parser().parse_args(stage.one("CMD").exec_form).command == "serve"


def test_runs_as_a_non_root_user(stage: Stage) -> None:
    user = stage.one("USER")
    assert stage.index(user) < stage.index(stage.one("ENTRYPOINT"))
    name, _, group = substitute(user.args, stage.variables()).partition(":")
    assert name not in ("root", "0") and group not in ("root", "0")
    created = [run for run in stage.runs if "useradd" in run]
    assert created, "no RUN creates the user"
    if name.isdigit():  # a numeric USER (Kubernetes' runAsNonRoot can check it) is the uid useradd gives
        assert any(re.search(rf"--uid[ =]{name}\b", run) for run in created), created


def shell_commands(command: str) -> list[list[str]]:
    """A shell-form RUN split into its simple commands (at `&&`, `||`, `;`, `|`), each as its words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _chowned(stage: Stage) -> list[tuple[int, str]]:
    """(instruction index, path) for each path a `chown` in a RUN hands over."""
    found = []
    for instruction in stage.all("RUN"):
        for words in shell_commands(substitute(instruction.args, stage.variables())):
            if words[0] == "chown":
                paths = [w for w in words[1:] if not w.startswith("-")][1:]  # after the owner
                found += [(stage.index(instruction), path) for path in paths]
    return found


def test_volumes_hold_everything_the_server_writes(stage: Stage) -> None:
    volumes = [v for i in stage.all("VOLUME") for v in (i.exec_form or i.args.split())]
    env = stage.env
    for name in ("HF_HOME", "FLUX2_DATA_DIR", "FLUX2_CACHE_DIR"):
        assert env.get(name) in volumes, f"{name}={env.get(name)} is not a VOLUME"
    settings = image_settings(stage)
    assert (
        str(settings.data_dir) == env["FLUX2_DATA_DIR"] and str(settings.cache_dir) == env["FLUX2_CACHE_DIR"]
    )
    for written in (settings.job_store_path, settings.files_dir, settings.lora_cache_dir):
        assert any(Path(volume) in written.parents for volume in volumes), written
    # The image's user owns them (set before VOLUME: later changes to a volume folder are discarded).
    volume_at = min(stage.index(i) for i in stage.all("VOLUME"))
    chowned = [path for index, path in _chowned(stage) if index < volume_at]
    for volume in volumes:
        assert any(volume == c or Path(c) in Path(volume).parents for c in chowned), f"{volume} not chowned"


def test_the_registry_comes_with_the_installed_package(stage: Stage) -> None:
    """Not from the container's working folder: the default registry is package data of a copied package."""
    registry = Settings().models_file.resolve()
    package = registry.parent.relative_to(ROOT).as_posix()
    assert registry.is_file() and package in dict(copies(stage))
    assert registry.name in PYPROJECT["tool"]["setuptools"]["package-data"][package]
    assert "FLUX2_MODELS_FILE" not in stage.env


# --- the build context -------------------------------------------------------------------------------------


def test_copied_paths_exist_and_reach_the_build(
    stage: Stage, ignore_rules: list[tuple[bool, re.Pattern[str]]]
) -> None:
    pairs = copies(stage)
    assert pairs
    for source, _ in pairs:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(ignore_rules, source), f"COPY {source}: left out by .dockerignore"
        if (ROOT / source).is_dir():
            for path in (ROOT / source).rglob("*"):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and "__pycache__" not in path.parts:
                    assert not ignored(ignore_rules, relative), f"{relative}: left out by .dockerignore"


def test_the_installed_project_is_complete(stage: Stage) -> None:
    """What `pip install` builds from must hold pyproject's readme and every package setuptools finds."""
    destinations = dict(copies(stage))
    build_dir = posixpath.dirname(destinations["pyproject.toml"])
    assert any(re.search(rf"pip install [^&;]*{re.escape(build_dir)}\b", run) for run in stage.runs)
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch(p.name, x) for x in patterns)
    )
    assert packages == ["pipeline", "server"]
    for source in [PYPROJECT["project"]["readme"], *packages]:
        assert destinations.get(source) == posixpath.join(build_dir, source), f"{source} is not copied"


def test_dockerignore_keeps_local_state_out(ignore_rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    for path in (
        ".venv",
        ".venv/bin/python",
        "tests/js/node_modules/@fal-ai/client/package.json",
        "data",
        "data/jobs.sqlite",
        ".git",
        ".git/HEAD",
        ".mypy_cache/x",
        ".ruff_cache/x",
        "flux2_lora_server.egg-info/PKG-INFO",
        "server/__pycache__/app.cpython-311.pyc",
        "lora.safetensors",
    ):
        assert ignored(ignore_rules, path), f"{path} would be sent to the Docker build"


# --- the healthcheck, run -----------------------------------------------------------------------------------


def healthcheck(stage: Stage) -> list[str]:
    instruction = stage.one("HEALTHCHECK")
    assert instruction.args.startswith("CMD "), "HEALTHCHECK CMD [...]"
    command = json.loads(instruction.args[4:])
    assert command[:2] in (["python", "-c"], ["python3", "-c"]), "only what the image has: its Python"
    return list(command)


def _urls(code: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[tuple[str, bool]]:
    """Run the healthcheck's code in-process, recording what it would GET (and whether with a TLS context)."""
    for name in ("FLUX2_PORT", "FLUX2_TLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, **kw: seen.append((url, kw.get("context") is not None))
    )
    exec(compile(code, "HEALTHCHECK", "exec"), {"__name__": "__main__"})
    return seen


def test_healthcheck_gets_health_on_the_servers_port(stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    code = healthcheck(stage)[2]
    port = Settings().port
    assert _urls(code, monkeypatch, {}) == [(f"http://127.0.0.1:{port}/health", False)]
    assert _urls(code, monkeypatch, {"FLUX2_PORT": "9123"}) == [("http://127.0.0.1:9123/health", False)]
    assert _urls(code, monkeypatch, {"FLUX2_TLS": "true"}) == [(f"https://127.0.0.1:{port}/health", True)]
    assert "/health" in {getattr(route, "path", None) for route in ops.router.routes}


@pytest.fixture
def health_server() -> Iterator[tuple[int, dict[str, int]]]:
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_exit_status(stage: Stage, health_server: tuple[int, dict[str, int]]) -> None:
    """0 (healthy) on a 200 from /health, non-zero (unhealthy) on an error status, as Docker reads it."""
    port, state = health_server
    command = [sys.executable, *healthcheck(stage)[1:]]
    env = {**os.environ, "FLUX2_PORT": str(port)}
    env.pop("FLUX2_TLS", None)
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    state["status"] = 503
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


# --- compose.yaml ------------------------------------------------------------------------------------------


def test_compose_builds_this_dockerfile_and_maps_the_port(compose_service: dict[str, Any]) -> None:
    build = compose_service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context).resolve() == ROOT and (ROOT / context / dockerfile).is_file()
    targets = []
    for port in compose_service["ports"]:
        target = port["target"] if isinstance(port, dict) else str(port).rsplit(":", 1)[-1].split("/")[0]
        targets.append(int(target))
    assert targets == [Settings().port]
    assert compose_service.get("restart") in ("always", "unless-stopped", "on-failure")


def test_compose_reserves_an_nvidia_gpu(compose_service: dict[str, Any]) -> None:
    devices = compose_service["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1
    count = gpus[0].get("count")
    assert count == "all" or (isinstance(count, int) and count >= 1) or gpus[0].get("device_ids")


def test_compose_passes_hf_token_from_the_environment(compose_service: dict[str, Any]) -> None:
    environment = compose_service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in environment)
    assert "HF_TOKEN" in environment
    value = environment["HF_TOKEN"]
    assert value is None or re.fullmatch(r"\$\{HF_TOKEN(:?[-?][^}]*)?\}", value), "never a token in the file"
    for name in ("FLUX2_HOST", "FLUX2_DATA_DIR", "FLUX2_CACHE_DIR", "HF_HOME"):
        assert name not in environment, f"{name} is the image's (its VOLUMEs are where it points)"


def test_compose_mounts_named_volumes_on_the_images_volumes(
    compose: dict[str, Any], compose_service: dict[str, Any], stage: Stage
) -> None:
    mounts: dict[str, str] = {}
    for volume in compose_service["volumes"]:
        if isinstance(volume, dict):
            assert volume.get("type", "volume") == "volume"
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
    image_volumes = {v for i in stage.all("VOLUME") for v in (i.exec_form or i.args.split())}
    assert set(mounts) == image_volumes
    assert set(mounts.values()) <= set(compose.get("volumes") or {}), "named volumes, declared"
