"""Turn a request's image bytes into the tensor a model expects.

Image data comes from the network, so decoding is fenced in: only PNG and JPEG, a cap on encoded
bytes and on the pixel size declared in the header (checked before any pixel is decoded), and every
decoder failure becomes an InvalidArgument with a message of our own — never the library's text.

What one image may cost is bounded too (issue 11): before any pixel is decoded, the header tells
how much memory the decoder will allocate — the pixel buffer, and for progressive or multi-scan
JPEGs the whole-image coefficient buffer — and how many scans a JPEG has (each scan re-walks every
coefficient: thousands of tiny scans cost seconds); over `ImageLimits` the image is refused. Large
JPEGs are decoded at the smallest DCT scale that still covers the model's size; large images are
converted to 8 bits and shrunk strip by strip, so no full-size intermediate is made. A
`DecodeBudget` is checked between the decoder's reads: a call that was cancelled or whose deadline
passed stops, and so does a decode past its CPU budget. Pure functions; the servicer runs them on
its decoding threads.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from aigis.auth.defaults import DEFAULT_MAX_MESSAGE_BYTES
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

    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the assembly passes config.max_message_bytes
    max_width: int = 4096
    max_height: int = 4096
    # The decoder's own allocation, known from the header: Pillow's pixel buffer (4 bytes per RGB
    # pixel, 2 per 16-bit gray) or a progressive JPEG's coefficient buffer (2 bytes per sample).
    max_decoded_bytes: int = 32 * 1024 * 1024
    # libjpeg's default progressive script has 10 scans (6 for gray); each costs a pass over
    # every coefficient (~2.5 ms at 4096x4096 on the reference machine).
    max_jpeg_scans: int = 32
    # Backstop, checked between the decoder's reads and between strips.
    max_cpu_seconds: float = 0.5


DEFAULT_LIMITS = ImageLimits()
# Images up to this many pixels take the exact path (full decode, convert, one resize); larger ones
# are decoded at reduced scale and shrunk strip by strip.
_SMALL_PIXELS = 1 << 20
_STRIP_ROWS = 256
# 16-bit samples to 8 bits, scaled (Pillow's own conversion would clip at 255): rint(x / 257).
_WIDE_TO_EIGHT = np.rint(np.arange(65536) / 257.0).astype(np.uint8)
# Bytes per pixel of Pillow's storage, by mode (RGB is stored as 4 bytes).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}


class DecodeStopped(InvalidArgument):
    """Decoding stopped: the call was cancelled or expired, or the image cost too much CPU."""


class DecodeBudget:
    """When to stop decoding one request's image. `cancel()` may be called from any thread."""

    def __init__(self, *, deadline: float | None = None, cpu_seconds: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() value, or None
        self.cpu_seconds = cpu_seconds
        self._cancelled = threading.Event()
        self._cpu_start: float | None = None

    @classmethod
    def for_call(cls, time_remaining: float | None, limits: ImageLimits) -> DecodeBudget:
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        return cls(deadline=deadline, cpu_seconds=limits.max_cpu_seconds)

    def cancel(self) -> None:
        self._cancelled.set()

    def start(self) -> None:
        """Start counting this thread's CPU time."""
        self._cpu_start = time.thread_time()
        self.check()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise DecodeStopped("the call was cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DecodeStopped("the call's deadline passed while its image was decoded")
        if (self.cpu_seconds is not None and self._cpu_start is not None
                and time.thread_time() - self._cpu_start > self.cpu_seconds):
            raise DecodeStopped(f"image took more than {self.cpu_seconds:g} s of CPU to decode")


class _CheckedReader(io.BytesIO):
    """The encoded bytes, with a budget check before each of the decoder's reads (64 KiB each)."""

    def __init__(self, data: bytes, budget: DecodeBudget | None) -> None:
        super().__init__(data)
        self._budget = budget

    def read(self, size: int | None = -1, /) -> bytes:
        if self._budget is not None:
            self._budget.check()
        return super().read(size)


def decode_image(data: bytes, width: int = 0, height: int = 0,
                 limits: ImageLimits = DEFAULT_LIMITS, *, target: tuple[int, int] | None = None,
                 budget: DecodeBudget | None = None) -> Image.Image:
    """Decode an encoded PNG/JPEG, or raw 8-bit grayscale when `width` and `height` are both set.

    With `target` (the model's width and height), a large JPEG may be decoded at a DCT scale of
    1/2, 1/4 or 1/8 that still covers it. Returns a fully loaded image; every problem with the input
    raises InvalidArgument (DecodeStopped when `budget` says stop).
    """
    if not data:
        raise InvalidArgument("image data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image data is {len(data)} bytes; the limit is {limits.max_bytes}")
    if width or height:
        return _decode_raw(data, width, height, limits)
    return _decode_encoded(data, limits, target, budget)


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


def _decode_encoded(
    data: bytes, limits: ImageLimits, target: tuple[int, int] | None, budget: DecodeBudget | None
) -> Image.Image:
    try:
        # formats= stops Pillow from trying its other (less exercised) decoders on hostile bytes.
        img = Image.open(_CheckedReader(data, budget), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidArgument("image data is not a valid PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check, far above our limit: an error above 2x its limit, a warning below
        # (an error under pytest; otherwise logged once, and our size check below refuses).
        raise InvalidArgument(f"image declares too many pixels; the limit is "
                              f"{limits.max_width}x{limits.max_height}") from None
    except _DECODE_ERRORS:
        raise InvalidArgument("image header is corrupt") from None
    # No `with img`: closing would drop the decoded pixels, and keeping them would need a full-size
    # copy. The file object is our in-memory reader; nothing else is held open.
    # The header's size is known before decoding: refuse big images before spending memory.
    _check_size(*img.size, limits)
    if img.width == 0 or img.height == 0:
        raise InvalidArgument("image has no pixels")
    if img.format == "JPEG":
        _check_jpeg_cost(img, data, limits)
        if target is not None and img.width * img.height > _SMALL_PIXELS:
            # DCT scaling: libjpeg produces 1/2, 1/4 or 1/8 of the size directly, at least `target`.
            img.draft(img.mode, target)
    decoded = img.width * img.height * _PIXEL_BYTES.get(img.mode, 4)
    if decoded > limits.max_decoded_bytes:
        raise InvalidArgument(f"image would decode to {decoded // 2**20} MiB of {img.mode} pixels; "
                              f"the limit is {limits.max_decoded_bytes // 2**20} MiB")
    try:
        img.load()
        # Phones store rotation as EXIF; honour it so the model sees the picture upright (in place:
        # an image without an orientation is not copied).
        ImageOps.exif_transpose(img, in_place=True)
    except _DECODE_ERRORS:
        raise InvalidArgument("image data is corrupt or truncated") from None
    return img


def _check_jpeg_cost(img: Image.Image, data: bytes, limits: ImageLimits) -> None:
    """Refuse a JPEG whose scans or whole-image coefficient buffer exceed the limits."""
    # Entropy-coded data stuffs every 0xFF with 0x00, so each FFDA is a real start-of-scan marker
    # (or one inside an APP segment, such as an EXIF thumbnail's: counted too, which errs safe).
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise InvalidArgument(f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans}")
    if scans > 1 or img.info.get("progressive") or img.info.get("progression"):
        # libjpeg keeps every DCT coefficient of the image (2 bytes each) until the last scan.
        layers = getattr(img, "layer", None) or [("", 1, 1, 0)]
        h_max = max(int(layer[1]) for layer in layers)
        v_max = max(int(layer[2]) for layer in layers)
        coefficients = sum(
            -(-img.width * int(h) // (8 * h_max)) * -(-img.height * int(v) // (8 * v_max)) * 64
            for _id, h, v, _q in layers
        )
        if coefficients * 2 > limits.max_decoded_bytes:
            raise InvalidArgument(f"progressive JPEG would need {coefficients * 2 // 2**20} MiB to decode; "
                                  f"the limit is {limits.max_decoded_bytes // 2**20} MiB")


def _convert(img: Image.Image, mode: ColorMode) -> Image.Image:
    if img.mode in _WIDE_GRAY_MODES:
        # Scale 16-bit samples to 8 bits (Pillow's own conversion would clip at 255).
        samples = np.asarray(img)
        if samples.dtype.kind == "u" and samples.dtype.itemsize == 2:
            eight = _WIDE_TO_EIGHT[samples]  # a 64 KiB table: exact, and no wide temporaries
        else:
            eight = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(eight, mode="L")
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
    x: np.ndarray = pixels.astype(np.float32) * np.float32(config.scale)
    x = (x - np.asarray(config.mean, dtype=np.float32)) / np.asarray(config.std, dtype=np.float32)
    if config.layout is Layout.FLAT:
        x = x.reshape(len(x), -1)
    elif config.layout is Layout.NCHW:
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def _shrink_in_strips(img: Image.Image, mode: ColorMode, size: tuple[int, int],
                      budget: DecodeBudget | None) -> Image.Image:
    """Convert and box-reduce a large image strip by strip, by the largest integer factor that
    keeps it at least `size`: no full-size converted copy is ever made."""
    factor = max(1, min(img.width // size[0], img.height // size[1]))
    width, height = img.width // factor * factor, img.height // factor * factor
    rows = factor * max(1, _STRIP_ROWS // factor)
    out: Image.Image | None = None
    for top in range(0, height, rows):
        if budget is not None:
            budget.check()
        strip = img.crop((0, top, width, min(top + rows, height)))
        if factor > 1 and strip.mode in _WIDE_GRAY_MODES:
            # Average while still 16-bit (Pillow cannot reduce I;16), then map the few results.
            wide = np.asarray(strip)
            blocks = wide.reshape(wide.shape[0] // factor, factor, wide.shape[1] // factor, factor)
            strip = Image.fromarray(_WIDE_TO_EIGHT[np.rint(blocks.mean(axis=(1, 3))).astype(np.uint16)], mode="L")
            strip = _convert(strip, mode)
        else:
            strip = _convert(strip, mode)
            if factor > 1:
                strip = strip.reduce(factor)
        if out is None:
            out = Image.new(strip.mode, (width // factor, height // factor))
        out.paste(strip, (0, top // factor))
    assert out is not None
    return out


def image_to_input(img: Image.Image, config: ModelConfig, budget: DecodeBudget | None = None) -> np.ndarray:
    """Convert to the model's colour mode, resize to its size, and make a batch of one."""
    size = (config.width, config.height)
    if img.width * img.height > _SMALL_PIXELS:
        img = _shrink_in_strips(img, config.color_mode, size, budget)
    img = _convert(img, config.color_mode)
    if img.size != size:
        shrinking = img.width >= config.width and img.height >= config.height
        # BOX averages every source pixel when shrinking (no aliasing); bicubic when enlarging.
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
        img = img.resize(size, resample)
    return pixels_to_input(np.asarray(img, dtype=np.uint8)[np.newaxis], config)


def prepare(data: bytes, width: int, height: int, config: ModelConfig,
            limits: ImageLimits = DEFAULT_LIMITS, budget: DecodeBudget | None = None) -> np.ndarray:
    """Request bytes to a model input batch of one: decode, then `image_to_input`."""
    if budget is not None:
        budget.start()
    target = (config.width, config.height)
    return image_to_input(decode_image(data, width, height, limits, target=target, budget=budget), config, budget)
