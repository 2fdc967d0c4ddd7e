"""Reference images as people send them: photos over a megapixel, rotated phone pictures, CMYK scans,
palettes with transparency, 16-bit PNGs, animations, damaged files and decompression bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from server.fetch.image_decode import ImageProblem, decode_reference, encode_raw

LIMIT = 64_000_000


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, 0 * x + y, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("size", [(1300, 900), (3000, 2000), (1025, 1024), (900, 7000)])
def test_large_images_are_scaled_exactly_as_the_pipeline_scales_them(size: tuple[int, int]) -> None:
    original = gradient(*size)
    ours = decode_reference(encoded(original, "PNG"), LIMIT)
    theirs = Flux2ImageProcessor._resize_to_target_area(original, 1024 * 1024)
    assert ours.size == theirs.size
    assert ours.width * ours.height <= 1024 * 1024
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_small_images_keep_every_pixel() -> None:
    original = gradient(640, 480)
    assert np.array_equal(np.asarray(decode_reference(encoded(original, "PNG"), LIMIT)), np.asarray(original))


def test_the_stored_file_is_lossless() -> None:
    image = gradient(300, 200)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_raw(image)))), np.asarray(image))


def test_exif_orientation_is_applied() -> None:
    upright = gradient(200, 100)  # a phone stores it sideways and says "rotate 90" in EXIF
    sideways = upright.transpose(Image.Transpose.ROTATE_270)  # stored turned a quarter clockwise
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation 8: the viewer turns it a quarter counterclockwise
    decoded = decode_reference(encoded(sideways, "PNG", exif=exif.tobytes()), LIMIT)
    assert decoded.size == (200, 100)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


def test_cmyk_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (100, 100), (0, 255, 255, 0))  # pure red ink
    decoded = decode_reference(encoded(cmyk, "JPEG", quality=100), LIMIT)
    assert decoded.mode == "RGB"
    red, green, blue = np.asarray(decoded).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 50, 100))  # left half opaque blue
    decoded = np.asarray(decode_reference(encoded(rgba, "PNG"), LIMIT))
    assert tuple(decoded[50, 10]) == (0, 0, 255)
    assert tuple(decoded[50, 90]) == (255, 255, 255)
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = palette.getpixel((90, 50))
    assert tuple(np.asarray(decode_reference(encoded(palette, "PNG"), LIMIT))[50, 90]) == (255, 255, 255)


def test_sixteen_bit_grayscale_keeps_its_tones() -> None:
    ramp = (np.linspace(0, 65535, 128, dtype=np.float64)[None, :].repeat(64, axis=0)).astype(np.uint16)
    decoded = np.asarray(decode_reference(encoded(Image.fromarray(ramp), "PNG"), LIMIT))
    assert decoded.shape == (64, 128, 3)
    assert decoded[0, 0, 0] == 0 and decoded[0, -1, 0] == 255  # PIL's plain conversion would clip to 255
    assert 120 <= decoded[0, 64, 0] <= 135


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (80, 80), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    assert tuple(np.asarray(decode_reference(buffer.getvalue(), LIMIT))[40, 40]) == (255, 0, 0)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 50_000])
def test_a_decompression_bomb_is_refused_from_its_header(side: int) -> None:
    with pytest.raises(ImageProblem, match="limit"):
        decode_reference(_png_header_only(side, side), LIMIT)


def test_damaged_and_foreign_data_are_refused_with_a_reason() -> None:
    with pytest.raises(ImageProblem, match="not an image"):
        decode_reference(b"<html>not found</html>", LIMIT)
    truncated = encoded(gradient(300, 300), "PNG")[:2000]
    with pytest.raises(ImageProblem, match="damaged or truncated"):
        decode_reference(truncated, LIMIT)
    with pytest.raises(ImageProblem, match="at least 64"):
        decode_reference(encoded(gradient(63, 300), "PNG"), LIMIT)
