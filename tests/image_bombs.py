"""The costliest images we can build that are still within aigis's documented image limits, and the
ones just beyond them (issue 11, item 11). Built at test time with Pillow and by hand (JPEG scans).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
from PIL import Image

MAX_SIDE = 4096


def encode(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _stuffed(bits: str) -> bytes:
    bits += "1" * (-len(bits) % 8)  # pad with 1 bits (T.81 F.1.2.3)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i : i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)  # byte stuffing
    return bytes(out)


def progressive_gray_jpeg(side: int, extra_scans: int) -> bytes:
    """A valid progressive grayscale JPEG plus `extra_scans` AC scans of EOB runs: a few bytes each,
    and each one a full pass of the decoder over every coefficient block of the image."""
    base = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=50)
    assert base.endswith(b"\xff\xd9")
    # AC table 1 with two symbols: EOB14 (run 16384 + 14 bits) = '0', EOB3 (run 8 + 3 bits) = '10'.
    dht = b"\xff\xc4" + struct.pack(">H", 21) + bytes([0x11, 1, 1] + [0] * 14) + bytes([0xE0, 0x30])
    blocks, bits = (side // 8) ** 2, ""
    while blocks >= 32767:
        bits += "0" + "1" * 14
        blocks -= 32767
    while blocks >= 8:
        bits += "10000"
        blocks -= 8
    assert blocks == 0
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0x00])  # Ss=1 Se=63
    return base[:-2] + dht + (sos + _stuffed(bits)) * extra_scans + b"\xff\xd9"


def _noise(shape: tuple[int, ...], dtype: type = np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(11).integers(0, high, shape, dtype=dtype)


def gray16_png(side: int, *, interlace: bool = False, noise: bool = False) -> bytes:
    values = _noise((side, side), np.uint16, 65536) if noise else np.full((side, side), 40_000, np.uint16)
    img = Image.frombytes("I;16", (side, side), values.astype("<u2").tobytes())
    return encode(img, "PNG", interlace=1 if interlace else 0)


def rgba_png(side: int, *, interlace: bool = False) -> bytes:
    return encode(Image.new("RGBA", (side, side), (10, 20, 30, 40)), "PNG", interlace=1 if interlace else 0)


def palette_png_with_transparency(side: int) -> bytes:
    rows, cols = np.indices((side, side))
    img = Image.fromarray(((rows // 3 + cols // 5) % 16).astype(np.uint8), mode="L").convert("P")
    return encode(img, "PNG", transparency=3)


def noisy_jpeg(side: int, mode: str, quality: int, subsampling: int) -> bytes:
    img = Image.fromarray(_noise((side, side, 3)), "RGB").convert(mode)
    return encode(img, "JPEG", quality=quality, subsampling=subsampling)


# name -> (image, what it attacks). Every one is within the limits and must decode within budget.
WORST_ACCEPTED: dict[str, tuple[Callable[[], bytes], str]] = {
    "gray16-png-4096": (lambda: gray16_png(4096), "36 KB that decode to 32 MiB of 16-bit samples"),
    "gray16-png-4096-interlaced": (lambda: gray16_png(4096, interlace=True), "Adam7: seven passes"),
    "gray16-png-1400-noise": (lambda: gray16_png(1400, noise=True), "incompressible, near 8 MiB of input"),
    "rgba-png-2896": (lambda: rgba_png(2896), "32 MiB of RGBA pixels, the decoded-size limit"),
    "rgba-png-2896-interlaced": (lambda: rgba_png(2896, interlace=True), "Adam7 at the limit"),
    "palette-png-4096-transparency": (lambda: palette_png_with_transparency(4096), "P with tRNS via RGBA"),
    "progressive-jpeg-4096-32-scans": (
        lambda: progressive_gray_jpeg(4096, 26), "32 scans over a 4096x4096 coefficient buffer (32 MiB)"
    ),
    "baseline-jpeg-rgb-444-noise": (lambda: noisy_jpeg(1800, "RGB", 95, 0), "~8 MiB of entropy-coded data"),
    "baseline-jpeg-4096-gray-noise": (lambda: noisy_jpeg(4096, "L", 40, 0), "a full-size 16 MP decode"),
    "cmyk-jpeg-2048": (lambda: noisy_jpeg(2048, "CMYK", 60, 0), "4 channels, inverted CMYK conversion"),
}

# name -> (image, the refusal message's start). Each is refused before its pixels are decoded.
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "jpeg-thousand-scans": (lambda: progressive_gray_jpeg(4096, 1000), "JPEG has 1006 scans; the limit is 32"),
    "jpeg-33-scans": (lambda: progressive_gray_jpeg(1024, 27), "JPEG has 33 scans; the limit is 32"),
    "progressive-jpeg-rgb-444-4096": (
        lambda: encode(Image.new("RGB", (4096, 4096)), "JPEG", progressive=True, subsampling=0),
        "progressive JPEG would need 96 MiB to decode",
    ),
    "rgba-png-4096": (lambda: rgba_png(4096), "image would decode to 64 MiB of RGBA pixels"),
    "rgb-png-4096": (
        lambda: encode(Image.new("RGB", (4096, 4096)), "PNG"),
        "image would decode to 64 MiB of RGB pixels",
    ),
}
