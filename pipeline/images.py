"""Encoding generated images into the bytes a client downloads."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.messages import CONTENT_TYPES, EncodedImage

# PNG at a low zlib level: generated images barely compress further at 9, and the time is on the hot path.
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 95},
}


def encode_image(image: Image.Image, output_format: str) -> EncodedImage:
    if output_format not in _SAVE_OPTIONS:
        raise ValueError(f"`output_format` must be one of {sorted(_SAVE_OPTIONS)}, got {output_format!r}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, **_SAVE_OPTIONS[output_format])  # type: ignore[arg-type]
    return EncodedImage(
        data=buffer.getvalue(),
        content_type=CONTENT_TYPES[output_format],
        width=image.width,
        height=image.height,
    )
