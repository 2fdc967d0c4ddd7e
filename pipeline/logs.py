"""Log setup for both processes (HTTP and worker): plain text or one JSON object per line, with the request
id when known. Imports neither torch nor FastAPI.

Code that logs about a request passes `extra={"request_id": ...}`; the formatters show it.
"""

from __future__ import annotations

import json
import logging
import warnings
from datetime import UTC, datetime

_PLAIN = "%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"

# Library messages that say nothing to a server operator, by logger, dropped before they reach a handler:
_NOISE = {
    # diffusers 0.42 passes tokenizer options to transformers 5's apply_chat_template the old way: a warning
    # on every prompt.
    "transformers.processing_utils": "have to be in `processor_kwargs`",
    # diffusers looks for tensor classes of older torchao versions, to unpickle their checkpoints.
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    # torchao registers its enums with torch.compile the old way, at import.
    "torch.utils._pytree": "register_constant() on Enum subclasses is deprecated",
    # bitsandbytes' optional CPU kernel, looked for at import; the server's 4-bit path runs on CUDA.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_library_noise() -> None:
    """Before the libraries are imported (some of these are said at import time)."""
    # torchao's FP8 tensors cannot be hashed for inductor's on-disk cache: compiles are simply not reused
    # across restarts. Said once per compile, it is not actionable.
    warnings.filterwarnings(
        "ignore", message=r".*does not implement _stable_hash_for_caching", category=UserWarning
    )
    for name, fragment in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request {request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    quiet_library_noise()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else _PlainFormatter(_PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log records too (one format for everything)
