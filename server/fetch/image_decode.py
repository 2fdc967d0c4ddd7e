"""A reference image's bytes made into what the worker takes: 8-bit RGB, upright, at most one megapixel.

Decoding happens here, in the HTTP process, under a pixel limit checked from the header before any pixel
is decoded (a decompression bomb is refused, never an out-of-memory), so a 50-megapixel photo never
crosses to the worker. The scale-down is `Flux2Pipeline`'s own rule, done the same way with the same PIL
call, so the image equals a direct pipeline call with the decoded original. Sizes are then floored to
multiples of 16 (and the image center-cropped) by the pipeline itself, in the worker.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

TARGET_AREA = 1024 * 1024  # Flux2Pipeline scales larger references down to this many pixels
MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input's limits: the pipeline refuses anything outside
MAX_ASPECT_RATIO = 8
_WHITE = (255, 255, 255, 255)


class ImageProblem(ValueError):
    """Why these bytes cannot be a reference image; the message is for the client."""


def decode_reference(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data` as the worker takes it: first frame, EXIF orientation applied, RGB, scaled to at
    most `TARGET_AREA` pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            opened = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:
            raise ImageProblem(f"the image is far over the {_megapixels(max_pixels)} limit") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageProblem(f"not an image this server can read ({_reason(exc)})") from None
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageProblem(
                f"the image is {width}x{height} ({_megapixels(width * height)}), over the "
                f"{_megapixels(max_pixels)} limit"
            )
        try:
            opened.seek(0)  # an animation's first frame
            image = ImageOps.exif_transpose(opened)  # decodes the pixels
            image = _to_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageProblem(f"the image data is damaged or truncated ({_reason(exc)})") from None
    _check_shape(*image.size)
    return scale_to_target_area(image)


def scale_to_target_area(image: Image.Image) -> Image.Image:
    """`Flux2ImageProcessor._resize_to_target_area` for images over the area, exactly: the same sizes
    (truncated, not rounded) and the same LANCZOS resampling."""
    width, height = image.size
    if width * height <= TARGET_AREA:
        return image
    scale = math.sqrt(TARGET_AREA / (width * height))
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def encode_raw(image: Image.Image) -> bytes:
    """The pixels as a PPM: lossless, so the worker sees exactly these, and written in a few milliseconds
    (a PNG encoder spends 170 ms on a noisy megapixel) for a file that lives only until the request ends."""
    buffer = io.BytesIO()
    image.save(buffer, format="PPM")
    return buffer.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, CMYK and palettes converted, 16-bit and float
    samples scaled to 8 bits (PIL's own conversion would clip them to white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        samples = np.asarray(image).astype(np.int64)
        image = Image.fromarray(np.clip(samples >> 8, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        samples = np.asarray(image)
        scale = 255.0 if samples.size and float(samples.max()) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(samples * scale, 0, 255).round().astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _check_shape(width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageProblem(f"the image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    if max(width / height, height / width) > MAX_ASPECT_RATIO:
        raise ImageProblem(
            f"the image is {width}x{height}; its aspect ratio must be at most {MAX_ASPECT_RATIO}:1"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
