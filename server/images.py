"""Turn a request's image bytes into the tensor a model expects.

Image data comes from the network, so decoding is fenced in: only PNG and JPEG, a cap on encoded
bytes and on the pixel size declared in the header (checked before any pixel is decoded), and every
decoder failure becomes an InvalidArgument with a message of our own — never the library's text.
Pure functions; the servicer runs them on a worker thread.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from aigis.server.errors import InvalidArgument
from aigis.server.model import ColorMode, Layout, ModelConfig

ALLOWED_FORMATS = ("PNG", "JPEG")
# Pillow opens 16-bit grayscale PNGs in these modes; converting them to "L" would clip, not scale.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
# What Pillow's decoders raise on hostile or broken input (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, struct.error, zlib.error,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Upper bounds on one request's image. Keep the server's max receive message size just above
    `max_bytes`, so oversize images fail here with a clear message rather than in the transport."""

    max_bytes: int = 8 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096


DEFAULT_LIMITS = ImageLimits()


def decode_image(data: bytes, width: int = 0, height: int = 0,
                 limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode an encoded PNG/JPEG, or raw 8-bit grayscale when `width` and `height` are both set.

    Returns a fully loaded image; every problem with the input raises InvalidArgument.
    """
    if not data:
        raise InvalidArgument("image data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image data is {len(data)} bytes; the limit is {limits.max_bytes}")
    if width or height:
        return _decode_raw(data, width, height, limits)
    return _decode_encoded(data, limits)


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width > limits.max_width or height > limits.max_height:
        raise InvalidArgument(f"image is {width}x{height} pixels; the limit is "
                              f"{limits.max_width}x{limits.max_height}")


def _decode_raw(data: bytes, width: int, height: int, limits: ImageLimits) -> Image.Image:
    if width <= 0 or height <= 0:
        raise InvalidArgument("width and height must both be positive for raw grayscale pixels "
                              "(or both 0 for an encoded PNG/JPEG)")
    _check_size(width, height, limits)
    if len(data) != width * height:
        raise InvalidArgument(f"raw grayscale data must be width*height = {width * height} bytes, "
                              f"got {len(data)}")
    return Image.frombytes("L", (width, height), data)


def _decode_encoded(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        # formats= stops Pillow from trying its other (less exercised) decoders on hostile bytes.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidArgument("image data is not a valid PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check, far above our limit: an error above 2x its limit, a warning below
        # (an error under pytest; otherwise logged once, and our size check below refuses).
        raise InvalidArgument(f"image declares too many pixels; the limit is "
                              f"{limits.max_width}x{limits.max_height}") from None
    except _DECODE_ERRORS:
        raise InvalidArgument("image header is corrupt") from None
    with img:
        # The header's size is known before decoding: refuse big images before spending memory.
        _check_size(*img.size, limits)
        if img.width == 0 or img.height == 0:
            raise InvalidArgument("image has no pixels")
        try:
            img.load()
            # Phones store rotation as EXIF; honour it so the model sees the picture upright.
            # It returns a copy, detached from the file object `with` closes.
            upright = ImageOps.exif_transpose(img)
        except _DECODE_ERRORS:
            raise InvalidArgument("image data is corrupt or truncated") from None
    return upright


def _convert(img: Image.Image, mode: ColorMode) -> Image.Image:
    if img.mode in _WIDE_GRAY_MODES:
        # Scale 16-bit samples to 8 bits (Pillow's own conversion would clip at 255).
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == mode.value:
        return img
    if img.mode in ("P", "PA"):
        # Via RGBA, as Pillow asks, so palette transparency is handled without a warning.
        img = img.convert("RGBA")
    try:
        return img.convert(mode.value)
    except ValueError:
        raise InvalidArgument(f"image pixel mode {img.mode!r} is not supported") from None


def pixels_to_input(pixels: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Normalise and lay out a batch of uint8 images, (N, H, W) or (N, H, W, C), for the model.

    The one definition of the model's input: training (tools/train_digits.py) calls it too, so a
    PNG of a training-format digit reaches the model bit for bit as it was trained.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels[..., np.newaxis]
    expected = (config.height, config.width, config.channels)
    if pixels.ndim != 4 or pixels.shape[1:] != expected:
        raise ValueError(f"pixels must be shaped (N, {expected[0]}, {expected[1]}[, {expected[2]}]), "
                         f"got {pixels.shape}")
    x = pixels.astype(np.float32) * np.float32(config.scale)
    x = (x - np.asarray(config.mean, dtype=np.float32)) / np.asarray(config.std, dtype=np.float32)
    if config.layout is Layout.FLAT:
        x = x.reshape(len(x), -1)
    elif config.layout is Layout.NCHW:
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def image_to_input(img: Image.Image, config: ModelConfig) -> np.ndarray:
    """Convert to the model's colour mode, resize to its size, and make a batch of one."""
    img = _convert(img, config.color_mode)
    size = (config.width, config.height)
    if img.size != size:
        shrinking = img.width >= config.width and img.height >= config.height
        # BOX averages every source pixel when shrinking (no aliasing); bicubic when enlarging.
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
        img = img.resize(size, resample)
    return pixels_to_input(np.asarray(img, dtype=np.uint8)[np.newaxis], config)


def prepare(data: bytes, width: int, height: int, config: ModelConfig,
            limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Request bytes to a model input batch of one: decode, then `image_to_input`."""
    return image_to_input(decode_image(data, width, height, limits), config)
