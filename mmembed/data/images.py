"""The one image decoder of the kit: training shards, evaluation readers and inference all call :func:`open_image`.

Every path gets the same pixels from the same file: the EXIF orientation is applied, alpha is composited on white,
16/32-bit and float grey are rescaled to 8 bits, and images above one per-decode pixel limit
(:data:`DEFAULT_MAX_PIXELS`, checked from the header before any pixel is decoded) are refused. PIL's process-wide
``Image.MAX_IMAGE_PIXELS`` is left alone.

Failures raise :class:`~mmembed.data.skips.SkipSample` (``corrupt_image``, ``decompression_bomb``,
``unsupported_mode``): the shard reader counts and skips them, the inference path turns them into one-line errors.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mmembed.data.skips import SkipSample

#: Per-decode pixel limit (width x height) for every path (shards, eval sets, the Python API). 50 MP fits an A4
#: page scanned at 600 dpi (~35 MP).
DEFAULT_MAX_PIXELS = 50_000_000

#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: alpha is composited on white, 16/32-bit and float grey are rescaled.

    Raises:
        SkipSample: ``unsupported_mode`` when PIL cannot convert the mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode.startswith("I") or mode == "F":
            arr = np.asarray(image, dtype=np.float64)
            if mode.startswith("I;16"):
                arr = arr / 257.0
            elif arr.size and (arr.min() < 0 or arr.max() > 255):
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) * (255.0 / (hi - lo or 1.0))
            return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode == "RGB":
                return image
            mode = "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")
    except (ValueError, OSError, TypeError) as exn:
        raise SkipSample("unsupported_mode", f"mode {mode}: {exn}") from exn


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise SkipSample("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not cost the image; keep it unrotated
        return image


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes, a file or an in-memory PIL image into a loaded 8-bit RGB image, EXIF rotation applied.

    Args:
        source: Encoded bytes, a path, or a PIL image (treated like a decoded file: pixel limit, EXIF rotation
            and mode conversion apply to it too, so an image passed in memory gives the pixels its file gives).
        max_pixels: Refuse images with more than this many pixels (checked from the header, before decoding).

    Raises:
        SkipSample: ``corrupt_image`` (not an image, truncated, missing file), ``decompression_bomb`` or
            ``unsupported_mode``.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return to_rgb(_oriented(source))
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        with warnings.catch_warnings():
            # our own limit replaces PIL's process-wide one; keep its warning out of the logs
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            _check_pixels(image.size, max_pixels)
            image.load()
    except Image.DecompressionBombError as exn:
        raise SkipSample("decompression_bomb", str(exn)) from exn
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exn:  # UnidentifiedImageError is an OSError
        raise SkipSample("corrupt_image", repr(exn)) from exn
    return to_rgb(_oriented(image))


def image_size(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of the image :func:`open_image` returns (EXIF rotation included), from the header only.

    Raises:
        SkipSample: As :func:`open_image`, for what the header alone shows.
    """
    if isinstance(source, Image.Image):
        return _oriented_size(source, max_pixels)
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                return _oriented_size(image, max_pixels)
    except Image.DecompressionBombError as exn:
        raise SkipSample("decompression_bomb", str(exn)) from exn
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exn:
        raise SkipSample("corrupt_image", repr(exn)) from exn


def _oriented_size(image: Image.Image, max_pixels: int) -> tuple[int, int]:
    _check_pixels(image.size, max_pixels)
    w, h = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- as in open_image: a broken EXIF block means no rotation
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def describe_source(source: object) -> str:
    """A short name for an image source in error messages (the path, or the type and size of in-memory data)."""
    if isinstance(source, str | os.PathLike):
        return str(Path(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"
