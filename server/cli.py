"""`flux2-server`: the command line."""

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
    serve = commands.add_parser("serve", help="serve the fal routes over HTTP")
    serve.add_argument("--model", help="a model from models.yaml (default: flux2-dev with CUDA, else tiny)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, env FLUX2_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, env FLUX2_PORT)")
    serve.add_argument(
        "--config", type=Path, dest="models_file", help="the model registry (default models.yaml)"
    )
    serve.add_argument("--data-dir", type=Path, help="generated files (default ./data, env FLUX2_DATA_DIR)")
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
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    try:
        settings = Settings.load(
            model=args.model,
            host=args.host,
            port=args.port,
            models_file=args.models_file,
            data_dir=args.data_dir,
            lora_folders=tuple(args.lora_folders) if args.lora_folders else None,
            log_json=args.log_json,
        )
        registry = load_registry(settings.models_file)
        if settings.model is not None:
            registry.get(settings.model)
    except (ConfigError, SettingsError) as exc:
        print(f"flux2-server: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings, registry)
    # log_config=None: uvicorn's own loggers go through the handler configured above (JSON included).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
