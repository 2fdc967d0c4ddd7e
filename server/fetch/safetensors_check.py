"""Is a file a complete safetensors file? Checked from its header alone, before anything reads a tensor.

Only safetensors is accepted anywhere: pickle formats are refused by name before any network access, and
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.fetch.errors import FetchFailure

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_CHUNK = 1024 * 1024
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class CheckedFile:
    """A complete safetensors file on local disk, whose content hashes to `sha256`."""

    file: Path
    sha256: str
    size: int


def is_pickle_name(name: str) -> bool:
    return name.lower().rstrip("/").endswith(PICKLE_SUFFIXES)


def validate_safetensors(file: Path) -> None:
    """Check that `file` is a complete safetensors file without reading tensor data.

    The header must be a JSON object of tensors with known dtypes, shapes whose byte size matches their
    offsets, and offsets that tile the data section exactly up to the end of the file. That catches
    truncated downloads, HTML error pages and pickles. Raises `FetchFailure`.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FetchFailure("the file is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise FetchFailure("the file is not a safetensors file (bad header length, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FetchFailure("the file is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FetchFailure("the file is not a safetensors file (header is not a JSON object)")
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FetchFailure("the safetensors metadata is malformed")
            continue
        spans.append(_tensor_span(name, info))
    if not spans:
        raise FetchFailure("the safetensors file holds no tensors")
    spans.sort()
    expected = 0
    for begin, end in spans:
        if begin != expected:
            raise FetchFailure("the safetensors tensors overlap or leave gaps")
        expected = end
    if 8 + n + expected != size:
        raise FetchFailure(
            f"the safetensors file is truncated or has trailing bytes "
            f"({size} bytes, the header says {8 + n + expected})"
        )


def _tensor_span(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise FetchFailure(f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise FetchFailure(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FetchFailure(f"tensor {name!r} has a malformed shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FetchFailure(f"tensor {name!r} has malformed data offsets")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise FetchFailure(f"tensor {name!r}: its shape and dtype do not match its byte size")
    return offsets[0], offsets[1]


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
