"""Server settings: command-line flags over `FLUX2_*` environment variables over defaults.

pydantic-settings reads and parses the variables; this module adds only what it does not do: list
variables split on `,` (names) or `:` (folders), `auto` for the tri-state `compile`, and errors that name
the variable or flag that was wrong. Built once at startup.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from pipeline.messages import WorkerConfig
from pipeline.models import PACKAGED_REGISTRY, Registry
from server.fetch.downloads import TransferLimits
from server.fetch.lora_fetcher import LoraPolicy
from server.fetch.reference_images import ReferencePolicy
from server.schemas import MAX_REFERENCE_IMAGES, PRESET_SIZES
from server.store.database import sqlite_url
from server.watchdog import WatchdogLimits

ENV_PREFIX = "FLUX2_"


class SettingsError(ValueError):
    pass


def _split(separator: str) -> Callable[[Any], Any]:
    """A list variable: `a,b` (or `a:b` for folders); empty parts are dropped. Flags arrive as tuples."""

    def split(value: Any) -> Any:
        return (
            tuple(part.strip() for part in value.split(separator) if part.strip())
            if isinstance(value, str)
            else value
        )

    return split


def _auto_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == "auto" else value


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flux2-lora-server"


UserPath = Annotated[Path, AfterValidator(Path.expanduser)]  # `~/x` works in variables as in a shell
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split(","))]
Folders = Annotated[tuple[UserPath, ...], NoDecode, BeforeValidator(_split(os.pathsep))]


class Settings(BaseSettings):
    # An empty variable counts as unset; a misspelt flag (a keyword argument) is an error.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    models_file: UserPath = PACKAGED_REGISTRY  # the registry shipped with the package; --config for another
    model: str | None = None  # None: flux2-dev with CUDA, tiny without
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: UserPath = Path("data")  # generated files, the job store, the TLS CA
    # The job store: unset, SQLite in the data folder; a URL (postgresql+psycopg://user:password@host/db)
    # puts it in that database instead, which several servers can share.
    database_url: str | None = None
    database_retry_seconds: float = 15.0  # how long a PostgreSQL that went away is waited for (a restart)
    cache_dir: UserPath = Field(default_factory=_default_cache_dir)  # built tiny models, downloaded LoRAs
    public_url: str | None = None  # base of file and queue URLs, when clients reach us through a proxy
    sse_ping_seconds: float = 15.0
    log_level: str = "info"
    log_json: bool = False  # one JSON object per log line
    tls: bool = False  # HTTPS, with a local CA kept in the data folder
    tls_hosts: Names = ()  # names the certificate covers, besides localhost and this host's name
    # LoRAs
    lora_folders: Folders = ()  # local LoRA paths are allowed only under these (os.pathsep list)
    allow_private_lora_urls: bool = False  # loopback / private / link-local LoRA URLs (SSRF guard off)
    allow_private_webhook_urls: bool = False  # the same for `?fal_webhook=` targets
    max_lora_rank: int = 128  # slot size; a LoRA of higher rank is refused
    lycoris_truncate: bool = False  # a LoKr/LoHa over the slot rank: approximated by SVD (error logged)
    lora_request_max_bytes: int = 5 * 1024**3  # all of one request's LoRAs together, as fal
    lora_cache_max_bytes: int = 50 * 1024**3  # downloaded LoRA files on disk
    lora_memory_max_bytes: int = 8 * 1024**3  # parsed LoRAs held in the worker's memory
    # Recently used LoRAs also kept on the GPU (switches among them are device copies); unset: half of
    # what the memory profile leaves free on the card, none with offload or on a CPU.
    lora_device_max_bytes: int | None = None
    download_deadline_seconds: float = 1800.0  # a LoRA download must end within this (from its turn)
    download_min_bytes_per_second: int = 32 * 1024  # ... and move at least this fast over each window
    download_rate_window_seconds: float = 30.0
    downloads_max: int = 16  # LoRA downloads at once; more wait their turn in the fetch stage
    downloads_per_host: int = 4  # ... and at once from one host
    # Edits
    max_reference_images: int = Field(default=4, ge=1, le=MAX_REFERENCE_IMAGES)  # per request, as fal's 4
    reference_image_max_bytes: int = 25 * 1024**2  # one reference as sent: download, data: URI or upload
    reference_image_max_pixels: int = 64_000_000  # one reference decoded (a decompression bomb is a 422)
    upload_max_bytes: int = 64 * 1024**2  # one upload (fal_client.upload_file, fal.storage.upload)
    prompt_cache_max_bytes: int = 1024**3  # text-encoder outputs kept on the device for repeated prompts
    api_keys: Names = ()  # FLUX2_API_KEYS=key1,key2: when set, every fal route needs one
    api_keys_file: UserPath | None = None  # or one key per line in a file
    result_ttl_seconds: float = 7 * 24 * 3600.0  # completed requests and their files are kept this long
    # Limits
    max_queue: int = 1000  # requests waiting (queued or fetching LoRAs); more are answered 429
    run_timeout_seconds: float = 600.0  # a generation running longer is stopped (504 generation_timeout)
    cancel_grace_seconds: float = 30.0  # then it has this long to stop before the worker is killed
    heartbeat_seconds: float = 120.0  # a running worker silent this long is hung: killed and replaced
    startup_timeout_seconds: float = 3600.0  # a model load longer than this is a failed start
    shutdown_grace_seconds: float = 25.0  # on SIGTERM, how long the running generation may still finish
    max_body_bytes: int = 1024**2  # request bodies (413 above)
    max_header_bytes: int = 16 * 1024  # request target and headers (431 above)
    # Acceleration
    compile: Annotated[bool | None, BeforeValidator(_auto_is_none)] = None  # None (auto): on CUDA only
    attention_backend: str | None = None  # a diffusers attention backend; unset: the fastest exact one
    memory_profile: str | None = None  # one of the model's memory_profiles; unset: chosen by device memory
    # Scale-out (`serve --ray`): the GPU workers as a Ray Serve deployment
    ray_address: str | None = None  # a running Ray cluster ("auto", "ray://head:10001"); unset: start one
    ray_ingress_replicas: int = Field(default=1, ge=1)  # HTTP front doors; they share one dispatcher
    ray_workers_min: int = Field(default=1, ge=1)  # GPU worker replicas: autoscaled between min and max
    ray_workers_max: int = Field(default=1, ge=1)
    ray_gpus_per_worker: float = Field(default=1.0, ge=0)  # 0: CPU replicas (tests, the tiny model)
    ray_lora_sets_per_worker: int = Field(default=8, ge=1)  # LoRA sets a replica is routed as holding
    ray_lora_affinity: bool = True  # route by LoRA set; off: Ray Serve's default (less busy of two)

    @model_validator(mode="after")
    def _workers_between(self) -> Settings:
        if self.ray_workers_max < self.ray_workers_min:
            raise ValueError(
                f"{ENV_PREFIX}RAY_WORKERS_MAX={self.ray_workers_max} is below "
                f"{ENV_PREFIX}RAY_WORKERS_MIN={self.ray_workers_min}"
            )
        return self

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags: object) -> Settings:
        """Defaults, then `FLUX2_<FIELD>` variables (of `env`, os.environ by default), then the flags that
        are not None."""
        variables = _Variables(cls, os.environ if env is None else env)()
        given = {name: value for name, value in flags.items() if value is not None}
        try:
            return cls.model_validate({**variables, **given})
        except ValidationError as exc:
            raise SettingsError(_describe(exc, given)) from None

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def job_store_path(self) -> Path:
        return self.data_dir / "jobs.sqlite"

    @property
    def job_store_url(self) -> str:
        return self.database_url or sqlite_url(self.job_store_path)

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
            transfers=TransferLimits(
                deadline=self.download_deadline_seconds,
                min_rate=self.download_min_bytes_per_second,
                rate_window=self.download_rate_window_seconds,
                max_concurrent=self.downloads_max,
                max_per_host=self.downloads_per_host,
            ),
        )

    def reference_policy(self) -> ReferencePolicy:
        return ReferencePolicy(self.reference_image_max_bytes, self.reference_image_max_pixels)

    @property
    def edit_body_max_bytes(self) -> int:
        """The body cap of the edit routes: room for every allowed reference as a base64 data: URI (4
        characters per 3 bytes) on top of the usual cap."""
        per_image = -(-self.reference_image_max_bytes * 4 // 3)
        return self.max_body_bytes + self.max_reference_images * per_image

    def watchdog_limits(self) -> WatchdogLimits:
        return WatchdogLimits(
            run_timeout=self.run_timeout_seconds,
            cancel_grace=self.cancel_grace_seconds,
            heartbeat=self.heartbeat_seconds,
            startup=self.startup_timeout_seconds,
        )

    def worker_config(self, registry: Registry) -> WorkerConfig:
        return WorkerConfig(
            registry,
            self.model,
            self.cache_dir,
            max_lora_rank=self.max_lora_rank,
            lora_memory_bytes=self.lora_memory_max_bytes,
            lora_device_bytes=self.lora_device_max_bytes,
            prompt_cache_bytes=self.prompt_cache_max_bytes,
            compile=self.compile,
            warmup_sizes=tuple(dict.fromkeys(PRESET_SIZES.values())),
            attention_backend=self.attention_backend,
            memory_profile=self.memory_profile,
            lycoris_truncate=self.lycoris_truncate,
            log_level=self.log_level,
            log_json=self.log_json,
        )


class _Variables(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ (so tests and
    the Dockerfile check can ask what a set of variables would give)."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str]) -> None:
        self._variables = variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._variables, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _describe(exc: ValidationError, flags: Mapping[str, object]) -> str:
    """pydantic's errors, each under the variable (or flag) the bad value came from."""
    problems = []
    for error in exc.errors(include_url=False):
        if not error["loc"]:  # a rule between settings: its message names them
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        source = f"--{field.replace('_', '-')}" if field in flags else ENV_PREFIX + field.upper()
        if error["type"] == "extra_forbidden":
            problems.append(f"{source} is not a setting")
        else:
            problems.append(f"{source}={error['input']!r}: {error['msg']}")
    return "; ".join(problems)
