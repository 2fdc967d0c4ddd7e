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
