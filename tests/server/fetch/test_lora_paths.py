"""What a LoRA path names: URL schemes, pickles refused by name, local paths only inside the LoRA folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from server.fetch.lora_fetcher import LoraFetcher
from tests.server.fetch.lora_server import (
    LoraServer,
    cache_files,
    fetch,
    fetch_error,
    lora_bytes,
    policy,
)


def test_malformed_url_refused(tmp_path: Path) -> None:
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["http://[::1/x.safetensors"])
    assert err.index == 0 and "malformed" in err.message


@pytest.mark.parametrize(
    "scheme", ["file:///etc/passwd", "ftp://example.com/x.safetensors", "s3://b/x.safetensors"]
)
def test_other_schemes_refused(tmp_path: Path, scheme: str) -> None:
    assert "only http:// and https://" in fetch_error(LoraFetcher(policy(tmp_path)), [scheme]).message


@pytest.mark.parametrize("ext", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".PT"])
def test_pickles_refused_by_name_without_any_request(server: LoraServer, tmp_path: Path, ext: str) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / f"x{ext}").write_bytes(b"not even read")
    pol = policy(tmp_path, folders=(folder,))
    for i, path in enumerate(
        [server.url(f"/x{ext}"), server.url(f"/x{ext}?download=1"), f"owner/repo/x{ext}", f"x{ext}"]
    ):
        err = fetch_error(LoraFetcher(pol), [lora_sources_path_ok(tmp_path)] * i + [path])
        assert err.index == i and "pickle" in err.message and path in err.message
    assert sum(server.hits.values()) == 0


def lora_sources_path_ok(tmp_path: Path) -> str:
    """A valid local entry to put before the failing one, so the index is checked."""
    file = tmp_path / "loras" / "ok.safetensors"
    file.write_bytes(lora_bytes(tmp_path, 99))
    return "ok.safetensors"


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    inside, outside = tmp_path / "loras", tmp_path / "elsewhere"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (inside / "sub" / "style.safetensors").write_bytes(lora_bytes(tmp_path, 20))
    (outside / "secret.safetensors").write_bytes(lora_bytes(tmp_path, 21))
    (inside / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (inside / "notes.safetensors").write_text("not a tensor file")
    return inside, outside


def test_local_path_inside_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    pol = policy(tmp_path, folders=(inside,))
    file = inside / "sub" / "style.safetensors"
    for path in ["sub/style.safetensors", str(file), "sub/../sub/style.safetensors"]:
        (lora,) = fetch(LoraFetcher(pol), [path])
        assert lora.file == file.resolve() and lora.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert lora.source == path and lora.size == file.stat().st_size
    assert cache_files(pol) == []  # local files are used in place, not copied


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("OUTSIDE/secret.safetensors", "outside the allowed LoRA folders"),
        ("../elsewhere/secret.safetensors", "outside the allowed LoRA folders"),
        ("sub/../../elsewhere/secret.safetensors", "outside the allowed LoRA folders"),
        ("link.safetensors", "outside the allowed LoRA folders"),
        ("/etc/passwd", "outside the allowed LoRA folders"),
        ("missing.safetensors", "not a URL, not a Hugging Face repo id"),
        ("INSIDE/missing.safetensors", "no such file"),
        ("notes.safetensors", "not a safetensors file"),
        ("INSIDE/sub", "not a regular file"),
    ],
)
def test_local_paths_refused(tmp_path: Path, folders: tuple[Path, Path], path: str, expected: str) -> None:
    inside, outside = folders
    path = path.replace("OUTSIDE", str(outside)).replace("INSIDE", str(inside))
    err = fetch_error(LoraFetcher(policy(tmp_path, folders=(inside,))), [path])
    assert err.index == 0 and path in err.message and expected in err.message, err.message


def test_local_paths_need_a_configured_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    err = fetch_error(LoraFetcher(policy(tmp_path)), [str(inside / "sub" / "style.safetensors")])
    assert "no LoRA folders are configured" in err.message


def test_local_file_shadows_repo_id_only_inside_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    (inside / "owner").mkdir()
    (inside / "owner" / "repo").write_bytes(lora_bytes(tmp_path, 22))
    (lora,) = fetch(LoraFetcher(policy(tmp_path, folders=(inside,))), ["owner/repo"])
    assert lora.file == (inside / "owner" / "repo").resolve()
