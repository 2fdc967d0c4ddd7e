"""models.yaml: the shipped registry parses, and every kind of mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.models import ConfigError, HubModel, TinyModel, load_registry

ROOT = Path(__file__).resolve().parents[2]
CHECKER = "    safety_checker: {source: tiny}\n"


def test_shipped_registry() -> None:
    registry = load_registry(ROOT / "models.yaml")
    dev, tiny = registry.get("flux2-dev"), registry.get("tiny")
    assert (
        isinstance(dev, HubModel)
        and dev.repo_id == "black-forest-labs/FLUX.2-dev"
        and dev.dtype == "bfloat16"
    )
    assert isinstance(tiny, TinyModel) and tiny.name == "tiny"
    assert registry.default_name(cuda_available=True) == "flux2-dev"
    assert registry.default_name(cuda_available=False) == "tiny"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("models:\n  m:\n    source: hub\n    dtype: bfloat16\n" + CHECKER, "models.m.hub.repo_id"),
        ("models:\n  m:\n    source: tiny\n    dtype: float8\n" + CHECKER, "models.m.tiny.dtype"),
        (
            "models:\n  m:\n    source: tiny\n    dtype: float32\n    seed: many\n" + CHECKER,
            "models.m.tiny.seed",
        ),
        ("models:\n  m:\n    source: ftp\n    dtype: float32\n", "models.m"),
        (
            "models:\n  m:\n    source: tiny\n    dtype: float32\n    colour: red\n" + CHECKER,
            "models.m.tiny.colour",
        ),
        (
            "models:\n  m:\n    source: tiny\n    dtype: float32\n",
            "models.m.tiny.safety_checker: Field required",
        ),
        (
            "models:\n  m:\n    source: tiny\n    dtype: float32\n"
            "    safety_checker: {source: tiny, threshold: 2}",
            "models.m.tiny.safety_checker.tiny.threshold",
        ),
        ("modles: {}\n", "models: Field required"),
        ("", "top level: Input should be a valid dictionary"),
        ("models: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_registry_names_the_field(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_registry(path)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'nope'.*flux2-dev, tiny"):
        load_registry(ROOT / "models.yaml").get("nope")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_registry(tmp_path / "absent.yaml")


GIB = 1024**3


@pytest.mark.parametrize(
    ("gib", "profile"),
    [(141, "full"), (139.8, "full"), (79.1, "fp8"), (47.5, "low-memory"), (31.4, "low-memory")],
)
def test_memory_profile_follows_the_device(gib: float, profile: str) -> None:
    dev = load_registry(ROOT / "models.yaml").get("flux2-dev")
    assert dev.memory_profile(int(gib * GIB)).name == profile


def test_too_little_memory_is_refused_with_what_each_profile_needs() -> None:
    dev = load_registry(ROOT / "models.yaml").get("flux2-dev")
    with pytest.raises(ConfigError) as refused:
        dev.memory_profile(24 * GIB)  # a 24 GB card: see models.yaml
    message = str(refused.value)
    assert "'flux2-dev' does not fit this device's 24.0 GiB" in message
    assert "'full' needs 119 GiB" in message and "'low-memory' needs 30 GiB" in message


def test_a_named_profile_is_used_only_where_it_fits() -> None:
    dev = load_registry(ROOT / "models.yaml").get("flux2-dev")
    assert dev.memory_profile(141 * GIB, "fp8").name == "fp8"  # asked for: taken over the roomier `full`
    with pytest.raises(ConfigError, match="'full' needs 119 GiB"):
        dev.memory_profile(80 * GIB, "full")
    with pytest.raises(ConfigError, match=r"no memory profile 'fp4'.*full, fp8, low-memory"):
        dev.memory_profile(80 * GIB, "fp4")


def test_profile_fields_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  m:\n    source: tiny\n    dtype: float32\n"
        + CHECKER
        + "    memory_profiles:\n      small: {min_device_memory_gib: 8, transformer: fp2}\n"
    )
    with pytest.raises(ConfigError, match=r"models\.m\.tiny\.memory_profiles\.small\.transformer"):
        load_registry(path)


def test_a_model_without_profiles_loads_in_full() -> None:
    tiny = load_registry(ROOT / "models.yaml").get("tiny")
    assert tiny.memory_profile(1 * GIB).name == "full"
