"""Settings: flags over FLUX2_* variables over defaults; bad values name their variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.load(env={})
    assert (settings.host, settings.port, settings.model, settings.compile) == (
        "127.0.0.1",
        8000,
        None,
        None,  # compile: decided by the device
    )
    assert settings.lora_folders == () and settings.max_lora_rank == 128


def test_environment_then_flags() -> None:
    env = {"FLUX2_PORT": "9000", "FLUX2_MODEL": "tiny", "FLUX2_LORA_FOLDERS": "/a:/b", "FLUX2_COMPILE": "yes"}
    settings = Settings.load(env=env, port=9100, model=None)
    assert settings.port == 9100  # the flag wins
    assert settings.model == "tiny"  # an absent flag (None) leaves the variable's value
    assert settings.lora_folders == (Path("/a"), Path("/b"))
    assert settings.compile is True


@pytest.mark.parametrize(("raw", "value"), [("auto", None), ("", None), ("on", True), ("off", False)])
def test_compile_is_auto_or_a_boolean(raw: str, value: bool | None) -> None:
    assert Settings.load(env={"FLUX2_COMPILE": raw}).compile is value


@pytest.mark.parametrize("raw", ["false", "0", "no", "off", "False"])
def test_false_is_false(raw: str) -> None:
    assert Settings.load(env={"FLUX2_ALLOW_PRIVATE_LORA_URLS": raw}).allow_private_lora_urls is False


@pytest.mark.parametrize(
    ("key", "raw"), [("FLUX2_PORT", "eighty"), ("FLUX2_COMPILE", "maybe"), ("FLUX2_SSE_PING_SECONDS", "soon")]
)
def test_bad_values_name_the_variable(key: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=key):
        Settings.load(env={key: raw})


def test_paths_expand_the_home_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    settings = Settings.load(env={"FLUX2_DATA_DIR": "~/data", "FLUX2_LORA_FOLDERS": "~/a:/b"})
    assert settings.data_dir == Path("/home/someone/data")
    assert settings.lora_folders == (Path("/home/someone/a"), Path("/b"))


def test_the_registry_is_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.load(env={}).models_file.is_file()
