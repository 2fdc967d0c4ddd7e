"""Server settings: command-line flags over `FLUX2_*` environment variables over defaults.

Built once at startup; a bad value stops the server with a message that names the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "FLUX2_"


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flux2-lora-server"


@dataclass(frozen=True)
class Settings:
    models_file: Path = Path("models.yaml")
    model: str | None = None  # None: flux2-dev with CUDA, tiny without
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")  # generated files (and, later, the job store)
    cache_dir: Path = field(default_factory=_default_cache_dir)  # built tiny models
    public_url: str | None = None  # base of file and queue URLs, when clients reach us through a proxy
    sse_ping_seconds: float = 15.0
    log_level: str = "info"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then `FLUX2_<FIELD>` variables, then explicit overrides (flags) that are not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _parse(key, env[key], str(f.type))
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


class SettingsError(ValueError):
    pass


def _parse(key: str, raw: str, type_name: str) -> object:
    try:
        if type_name.startswith("Path"):
            return Path(raw).expanduser()
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not a valid {type_name}") from None
    return raw or None if "None" in type_name else raw
