"""LoRAs from the Hugging Face Hub, offline: from its cache, or a clear error."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from server.fetch.lora_fetcher import LoraFetcher
from tests.server.fetch.lora_server import (
    fetch,
    fetch_error,
    lora_bytes,
    policy,
)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def _cache_repo(hub: Path, repo: str, files: dict[str, bytes]) -> None:
    """Lay out a repo in the Hub cache the way huggingface_hub does (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_hub_repo_offline_and_not_cached_is_a_clear_error(tmp_path: Path, offline_hub: Path) -> None:
    for path in ["nobody-here/no-such-lora", "nobody-here/no-such-lora/sub/x.safetensors"]:
        start = time.monotonic()
        err = fetch_error(LoraFetcher(policy(tmp_path)), [path])
        assert time.monotonic() - start < 2
        assert err.index == 0 and path in err.message and "HF_HUB_OFFLINE" in err.message, err.message


def test_hub_repo_from_the_offline_cache(tmp_path: Path, offline_hub: Path) -> None:
    one, two = lora_bytes(tmp_path, 40), lora_bytes(tmp_path, 41)
    _cache_repo(offline_hub, "someone/one-lora", {"lora.safetensors": one, "README.md": b"hi"})
    _cache_repo(offline_hub, "someone/two-loras", {"a.safetensors": one, "sub/b.safetensors": two})
    (lora,) = fetch(LoraFetcher(policy(tmp_path)), ["someone/one-lora"])
    assert lora.sha256 == hashlib.sha256(one).hexdigest() and lora.file.name == "lora.safetensors"
    (picked,) = fetch(LoraFetcher(policy(tmp_path)), ["someone/two-loras/sub/b.safetensors"])
    assert picked.sha256 == hashlib.sha256(two).hexdigest()


@pytest.mark.parametrize(
    ("files", "picked"),
    [
        # The Turbo LoRA's shape: the main file, and a ComfyUI copy in a folder.
        (["flux2-turbo-lora.safetensors", "comfy/flux2-turbo-lora-comfyui.safetensors", "README.md"], 0),
        (["style.safetensors", "pytorch_lora_weights.safetensors"], 1),  # diffusers' own name wins
        (["checkpoint-500/lora.safetensors", "optimizer.safetensors", "lora.safetensors"], 2),  # not LoRAs
        (["sub/only.safetensors", "model.bin"], 0),
    ],
)
def test_a_repo_with_several_files_gives_its_lora_as_diffusers_picks_it(
    tmp_path: Path, offline_hub: Path, files: list[str], picked: int
) -> None:
    blobs = {name: lora_bytes(tmp_path, seed) for seed, name in enumerate(files)}
    _cache_repo(offline_hub, "someone/several", blobs)
    (lora,) = fetch(LoraFetcher(policy(tmp_path)), ["someone/several"])
    assert lora.sha256 == hashlib.sha256(blobs[files[picked]]).hexdigest()


def test_a_repo_whose_lora_cannot_be_told_is_refused_with_its_files(
    tmp_path: Path, offline_hub: Path
) -> None:
    files = ["a.safetensors", "b_comfyui.safetensors", "sub/c.safetensors"]
    _cache_repo(
        offline_hub, "someone/two-loras", {name: lora_bytes(tmp_path, i) for i, name in enumerate(files)}
    )
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["someone/two-loras"])
    assert "2 .safetensors files" in err.message and "a.safetensors, b_comfyui.safetensors" in err.message
    assert "name one as owner/repo/file.safetensors" in err.message


def test_hub_file_must_be_safetensors(tmp_path: Path, offline_hub: Path) -> None:
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["someone/repo/readme.md"])
    assert "must name a .safetensors file" in err.message


def test_a_hub_download_past_the_deadline_fails_its_entry(
    tmp_path: Path, offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.fetch import lora_fetcher

    def stuck(*args: object) -> Path:  # huggingface_hub waiting on a server that never finishes
        time.sleep(1.0)
        raise AssertionError("the deadline should have ended the wait")

    monkeypatch.setattr(lora_fetcher, "hub_file", stuck)
    err = fetch_error(LoraFetcher(policy(tmp_path, deadline=0.2)), ["someone/slow-lora"])
    assert err.index == 0 and "did not finish within 0.2 s" in err.message
