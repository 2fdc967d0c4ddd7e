"""`flux2-server`: serve the fal routes, or print the environment for unmodified fal clients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import FrameType

from pipeline.logs import configure_logging
from pipeline.models import ConfigError, load_registry
from server.config import Settings, SettingsError
from server.store.database import StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the fal routes over HTTP (or HTTPS with --tls)")
    serve.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines (env FLUX2_LOG_JSON)"
    )
    serve.add_argument(
        "--ray",
        action="store_true",
        help="scale out on Ray Serve: GPU worker replicas behind the same routes (docs/SCALING.md)",
    )

    generate = commands.add_parser("generate", help="generate images locally, without a server")
    generate.add_argument("prompt")
    generate.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA URL, Hugging Face repo or local file, with an optional scale (up to 3)",
    )
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE_OR_URL",
        help="a reference image to edit or compose from (repeatable): a local file, an http(s) or data: URL",
    )
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="image file (out.png)")
    generate.add_argument(
        "--size",
        help="a preset (square_hd, ...) or WIDTHxHEIGHT (default landscape_4_3; with --image: the first's)",
    )
    generate.add_argument("--steps", type=int, default=28)
    generate.add_argument("--guidance", type=float, default=2.5)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument(
        "--acceleration",
        choices=("none", "regular", "high"),
        default="regular",
        help="eager, compiled (on CUDA), or compiled with a step cache (default regular)",
    )

    download = commands.add_parser("download", help="prefetch a model's weights (resumable)")
    download.add_argument("--model", default="flux2-dev", help="a model from models.yaml (flux2-dev)")

    env = commands.add_parser(
        "env", help="print the variables under which an unmodified fal_client script calls this server"
    )

    lora_info = commands.add_parser(
        "lora-info", help="what a LoRA file is: layout, rank, alpha, layers, and whether the server takes it"
    )
    lora_info.add_argument("path", help="a LoRA: a file, a URL or a Hugging Face repo, as in `loras`")

    for command in (serve, generate, download):
        command.add_argument(
            "--config",
            type=Path,
            dest="models_file",
            help="a model registry (default: models.yaml, shipped with the package)",
        )
    for command in (serve, generate):
        command.add_argument(
            "--model", help="a model from models.yaml (default: flux2-dev with CUDA, else tiny)"
        )
    for command in (serve, generate, lora_info):
        command.add_argument(
            "--lora-folder",
            type=Path,
            action="append",
            dest="lora_folders",
            help="a folder local LoRA paths may come from (repeatable; env FLUX2_LORA_FOLDERS)",
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
    """Flags that a command has and the user gave override FLUX2_* variables; the rest stay as they are."""
    given = vars(args)
    folders = given.get("lora_folders")
    return Settings.load(
        model=given.get("model") if args.command != "download" else None,
        host=given.get("host"),
        port=given.get("port"),
        models_file=given.get("models_file"),
        data_dir=given.get("data_dir"),
        tls=given.get("tls"),
        lora_folders=tuple(folders) if folders else None,
        log_json=given.get("log_json"),
    )


def serve(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app
    from server.services import Services
    from server.tls import ensure_certificates

    registry = load_registry(settings.models_file)
    if settings.model is not None:
        registry.get(settings.model)
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings, registry)
    services: Services = app.state.services
    files = ensure_certificates(settings.data_dir, settings.tls_host_names) if settings.tls else None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's own loggers go through the handler configured above (JSON included)
        ssl_certfile=str(files.cert) if files else None,
        ssl_keyfile=str(files.key) if files else None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )

    class Server(uvicorn.Server):
        """uvicorn's server, telling the scheduler about stop signals: the first (SIGTERM, or Ctrl-C)
        drains: no new job starts, the running one may finish within the grace period, open requests
        end; a second stops at once (the worker killed, no wait), still losing nothing accepted."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            again = self.should_exit
            super().handle_exit(sig, frame)
            self.force_exit = self.force_exit or again  # SIGTERM twice as well as Ctrl-C twice
            if services.scheduler is not None:
                services.scheduler.stop_signal(again)

    Server(config).run()
    return 0


def serve_ray(settings: Settings) -> int:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        print("flux2-server: --ray needs Ray Serve: pip install 'flux2-lora-server[ray]'", file=sys.stderr)
        return 2
    from server.scaleout.application import run

    if settings.tls:
        print("flux2-server: --tls is not available with --ray (terminate TLS in front)", file=sys.stderr)
        return 2
    registry = load_registry(settings.models_file)
    if settings.model is not None:
        registry.get(settings.model)
    configure_logging(settings.log_level, settings.log_json)
    failure = run(settings, registry)
    if failure is not None:
        print(f"flux2-server: {failure}", file=sys.stderr)
        return 2
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


def _generate(settings: Settings, args: argparse.Namespace) -> int:
    from server.oneshot import generate, parse_lora, reference_url

    size: object = args.size or (None if args.image else "landscape_4_3")
    if args.size:
        width, _, height = args.size.partition("x")
        if width.isdigit() and height.isdigit():
            size = {"width": int(width), "height": int(height)}
    try:
        references = [reference_url(text) for text in args.image]
    except OSError as exc:
        print(f"flux2-server: --image {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    body: dict[str, object] = {
        "prompt": args.prompt,
        "image_size": size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "acceleration": args.acceleration,
        "output_format": {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
            args.output.suffix.lower(), "png"
        ),
        "loras": [parse_lora(text) for text in args.lora],
        **({"image_urls": references} if references else {}),
    }
    return generate(settings, load_registry(settings.models_file), body, args.output)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "serve":
            return serve_ray(settings) if args.ray else serve(settings)
        if args.command == "generate":
            return _generate(settings, args)
        if args.command == "download":
            from server.oneshot import download

            return download(settings, load_registry(settings.models_file), args.model)
        if args.command == "lora-info":
            from server.oneshot import lora_info

            return lora_info(settings, args.path)
        return env(settings)
    except (ConfigError, SettingsError, StoreError) as exc:
        print(f"flux2-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
