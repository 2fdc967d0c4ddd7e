"""Server settings: command-line flags over `FLUX2_*` environment variables over defaults.

Built once at startup; a bad value stops the server with a message that names the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.lora_sources import LoraPolicy
from pipeline.models import Registry
from pipeline.worker import WorkerConfig
from server.schemas import PRESET_SIZES

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
    log_json: bool = False  # one JSON object per log line
    tls: bool = False  # HTTPS, with a local CA kept in the data folder
    tls_hosts: tuple[str, ...] = ()  # names the certificate covers, besides localhost and this host's name
    # LoRAs
    lora_folders: tuple[Path, ...] = ()  # local LoRA paths are allowed only under these (os.pathsep list)
    allow_private_lora_urls: bool = False  # loopback / private / link-local LoRA URLs (SSRF guard off)
    allow_private_webhook_urls: bool = False  # the same for `?fal_webhook=` targets
    max_lora_rank: int = 128  # slot size; a LoRA of higher rank is refused
    lora_request_max_bytes: int = 5 * 1024**3  # all of one request's LoRAs together, as fal
    lora_cache_max_bytes: int = 50 * 1024**3  # downloaded LoRA files on disk
    lora_memory_max_bytes: int = 8 * 1024**3  # parsed LoRAs held in the worker's memory
    prompt_cache_max_bytes: int = 1024**3  # text-encoder outputs kept on the device for repeated prompts
    api_keys: tuple[str, ...] = ()  # FLUX2_API_KEYS=key1,key2: when set, every fal route needs one
    api_keys_file: Path | None = None  # or one key per line in a file
    result_ttl_seconds: float = 7 * 24 * 3600.0  # completed requests and their files are kept this long
    # Limits
    max_queue: int = 1000  # requests waiting (queued or fetching LoRAs); more are answered 429
    run_timeout_seconds: float = 600.0  # a generation running longer is stopped (504 generation_timeout)
    max_body_bytes: int = 1024**2  # request bodies (413 above)
    max_header_bytes: int = 16 * 1024  # request target and headers (431 above)
    # Acceleration
    compile: bool | None = None  # compile for `regular`/`high` (auto: on CUDA only; CPU compiles are slow)
    attention_backend: str | None = None  # a diffusers attention backend; unset: the fastest exact one
    memory_profile: str | None = None  # one of the model's memory_profiles; unset: chosen by device memory

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

    @property
    def job_store_path(self) -> Path:
        return self.data_dir / "jobs.sqlite"

    @property
    def tls_host_names(self) -> tuple[str, ...]:
        from server.tls import default_hosts

        extra = (self.host,) if self.host not in ("0.0.0.0", "::") else ()
        return tuple(dict.fromkeys((*default_hosts(), *extra, *self.tls_hosts)))

    @property
    def lora_cache_dir(self) -> Path:
        return self.cache_dir / "loras"

    def lora_policy(self) -> LoraPolicy:
        return LoraPolicy(
            cache_dir=self.lora_cache_dir,
            folders=self.lora_folders,
            allow_private_addresses=self.allow_private_lora_urls,
            max_total_bytes=self.lora_request_max_bytes,
            cache_max_bytes=self.lora_cache_max_bytes,
        )

    def worker_config(self, registry: Registry) -> WorkerConfig:
        return WorkerConfig(
            registry,
            self.model,
            self.cache_dir,
            max_lora_rank=self.max_lora_rank,
            lora_memory_bytes=self.lora_memory_max_bytes,
            prompt_cache_bytes=self.prompt_cache_max_bytes,
            compile=self.compile,
            warmup_sizes=tuple(dict.fromkeys(PRESET_SIZES.values())),
            attention_backend=self.attention_backend,
            memory_profile=self.memory_profile,
            log_level=self.log_level,
            log_json=self.log_json,
        )


class SettingsError(ValueError):
    pass


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _parse(key: str, raw: str, type_name: str) -> object:
    if type_name.startswith("bool"):
        word = raw.strip().lower()
        if "None" in type_name and word in ("", "auto"):
            return None
        if word not in _BOOLS:
            also = ", or auto" if "None" in type_name else ""
            raise SettingsError(f"{key}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off{also})")
        return _BOOLS[word]
    if type_name.startswith("tuple[Path"):
        return tuple(Path(part).expanduser() for part in raw.split(os.pathsep) if part)
    if type_name.startswith("tuple[str"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
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
