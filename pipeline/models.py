"""The model registry: `models.yaml` parsed into typed specs, with errors that name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PACKAGED_REGISTRY = Path(__file__).with_name("models.yaml")  # shipped with the package: found from anywhere

Dtype = Literal["bfloat16", "float16", "float32"]
Device = Literal["auto", "cuda", "cpu"]


class ConfigError(ValueError):
    """models.yaml (or a model choice) is unusable; the message names the file and the field."""


class HubSafetyChecker(BaseModel):
    """An image classifier with an `nsfw` label (FLUX.2's reference: Falconsai/nsfw_image_detection)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["hub"]
    repo_id: str
    revision: str = "main"
    local_dir: Path | None = None
    threshold: float = Field(default=0.85, ge=0.0, le=1.0)


class TinySafetyChecker(BaseModel):
    """A random-weight ViT classifier with the same labels, built offline, for tests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["tiny"]
    threshold: float = Field(default=0.85, ge=0.0, le=1.0)


SafetyCheckerSpec = Annotated[HubSafetyChecker | TinySafetyChecker, Field(discriminator="source")]


Quantization = Literal["none", "fp8", "int8", "nf4"]


class MemoryProfile(BaseModel):
    """How the model's weights are held on a device of at least `min_device_memory_gib`.

    `fp8` and `int8` quantize a component's Linear weights through torchao (`fp8` in the transformer also
    runs its matmuls in FP8 where the GPU has FP8 tensor cores, compute capability 8.9+), `nf4` through
    bitsandbytes (CUDA only); `none` keeps the model's dtype. `offload: model` keeps components in CPU
    memory and moves each to the GPU while it runs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""  # filled from the profile's key
    min_device_memory_gib: float = Field(ge=0)
    transformer: Quantization = "none"
    text_encoder: Quantization = "none"
    offload: Literal["none", "model"] = "none"


_DEFAULT_PROFILES = {"full": MemoryProfile(name="full", min_device_memory_gib=0)}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""  # filled from the registry key
    dtype: Dtype
    device: Device = "auto"
    safety_checker: SafetyCheckerSpec
    memory_profiles: dict[str, MemoryProfile] = Field(default_factory=lambda: dict(_DEFAULT_PROFILES))

    def memory_profile(self, device_memory_bytes: int, requested: str | None = None) -> MemoryProfile:
        """The named profile, or the one needing the most memory that the device has; refuses with what
        would have been needed when nothing fits."""
        have = device_memory_bytes / 1024**3
        profiles = sorted(self.memory_profiles.values(), key=lambda p: p.min_device_memory_gib, reverse=True)
        if requested is not None:
            if requested not in self.memory_profiles:
                known = ", ".join(self.memory_profiles)
                raise ConfigError(f"model {self.name!r} has no memory profile {requested!r}; it has: {known}")
            profiles = [self.memory_profiles[requested]]
        for profile in profiles:
            if profile.min_device_memory_gib <= have:
                return profile
        need = ", ".join(f"{p.name!r} needs {p.min_device_memory_gib:g} GiB" for p in profiles)
        raise ConfigError(
            f"model {self.name!r} does not fit this device's {have:.1f} GiB of memory: {need}"
            " (see memory_profiles in models.yaml)"
        )


class HubModel(_Spec):
    """A diffusers folder from the Hugging Face cache (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE), or `local_dir`."""

    source: Literal["hub"]
    repo_id: str
    revision: str = "main"
    local_dir: Path | None = None


class TinyModel(_Spec):
    """A random-weight FLUX.2-shaped pipeline built offline on first use (see `pipeline.tiny`)."""

    source: Literal["tiny"]
    seed: int = 0


ModelSpec = Annotated[HubModel | TinyModel, Field(discriminator="source")]


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelSpec]


class Registry:
    def __init__(self, models: dict[str, HubModel | TinyModel]) -> None:
        self.models = models

    def get(self, name: str) -> HubModel | TinyModel:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ConfigError(f"unknown model {name!r}; models.yaml defines: {known}") from None

    def default_name(self, cuda_available: bool) -> str:
        """The real model when there is a GPU to run it, the tiny one otherwise."""
        preferred = "flux2-dev" if cuda_available else "tiny"
        if preferred in self.models:
            return preferred
        raise ConfigError(f"no --model given and models.yaml has no {preferred!r} entry")


def load_registry(path: Path) -> Registry:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        parsed = TypeAdapter(_RegistryFile).validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from exc
    models = {
        name: spec.model_copy(
            update={
                "name": name,
                "memory_profiles": {
                    key: profile.model_copy(update={"name": key})
                    for key, profile in spec.memory_profiles.items()
                },
            }
        )
        for name, spec in parsed.models.items()
    }
    return Registry(models)
