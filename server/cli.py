"""`flux2-server`: serve the fal routes, or print the environment for unmodified fal clients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.logs import configure_logging
from pipeline.models import ConfigError, load_registry
from server.config import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the fal routes over HTTP (or HTTPS with --tls)")
    serve.add_argument("--model", help="a model from models.yaml (default: flux2-dev with CUDA, else tiny)")
    serve.add_argument(
        "--config", type=Path, dest="models_file", help="the model registry (default models.yaml)"
    )
    serve.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines (env FLUX2_LOG_JSON)"
    )
    serve.add_argument(
        "--lora-folder",
        type=Path,
        action="append",
        dest="lora_folders",
        help="a folder local LoRA paths may come from (repeatable; env FLUX2_LORA_FOLDERS)",
    )

    env = commands.add_parser(
        "env", help="print the variables under which an unmodified fal_client script calls this server"
    )
    for command in (serve, env):
        command.add_argument("--host", help="address to bind / to reach (default 127.0.0.1, env FLUX2_HOST)")
        command.add_argument("--port", type=int, help="port (default 8000, env FLUX2_PORT)")
        command.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FLUX2_DATA_DIR)")
        command.add_argument(
            "--tls",
            action="store_true",
            default=None,
            help="HTTPS with a local CA made once in the data folder (env FLUX2_TLS)",
        )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        model=getattr(args, "model", None),
        host=args.host,
        port=args.port,
        models_file=getattr(args, "models_file", None),
        data_dir=args.data_dir,
        tls=args.tls,
        lora_folders=tuple(args.lora_folders) if getattr(args, "lora_folders", None) else None,
        log_json=getattr(args, "log_json", None),
    )


def serve(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app
    from server.tls import ensure_certificates

    registry = load_registry(settings.models_file)
    if settings.model is not None:
        registry.get(settings.model)
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings, registry)
    files = ensure_certificates(settings.data_dir, settings.tls_host_names) if settings.tls else None
    # log_config=None: uvicorn's own loggers go through the handler configured above (JSON included).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        ssl_certfile=str(files.cert) if files else None,
        ssl_keyfile=str(files.key) if files else None,
    )
    return 0


def env(settings: Settings) -> int:
    """The lines to `eval` before running a fal_client script unchanged against this server."""
    from server.tls import ensure_certificates

    if not settings.tls:
        print(
            "flux2-server env: fal_client always uses https; serve with --tls and pass --tls here",
            file=sys.stderr,
        )
        return 2
    files = ensure_certificates(settings.data_dir, settings.tls_host_names)
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    address = f"{host}:{settings.port}"
    print(f"export FAL_RUN_HOST={address}")
    print(f"export FAL_QUEUE_RUN_HOST={address}/queue")
    print(f"export SSL_CERT_FILE={files.ca_cert.resolve()}")
    print("export FAL_KEY=${FAL_KEY:-local}  # any key while the server has none configured")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        return serve(settings) if args.command == "serve" else env(settings)
    except (ConfigError, SettingsError) as exc:
        print(f"flux2-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
