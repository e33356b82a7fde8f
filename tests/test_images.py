"""Image decoding and preprocessing: hostile or broken bytes are refused with a clear message, and
good images become exactly the tensor each model layout expects."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from aigis.server.errors import InvalidArgument
from aigis.server.images import ImageLimits, decode_image, image_to_input, pixels_to_input, prepare
from aigis.server.model import ColorMode, Layout, ModelConfig, OutputKind

GRAY8 = ModelConfig(
    name="gray", version="1", input_name="x", layout=Layout.FLAT, width=8, height=8,
    color_mode=ColorMode.L, scale=1 / 255, mean=(0.0,), std=(1.0,), output_kind=OutputKind.PROBABILITIES,
)
RGB4 = replace(GRAY8, layout=Layout.NCHW, width=4, height=4, color_mode=ColorMode.RGB,
               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def encode(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width x height but carries almost no pixel data:
    the shape of a decompression bomb, without the bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _chunk(b"IEND", b""))


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
NOISE_PNG = encode(NOISE)
NOISE_JPEG = encode(NOISE, "JPEG")

BAD_IMAGES = [
    pytest.param(b"", 0, 0, "image data is empty", id="empty"),
    pytest.param(b"", 8, 8, "image data is empty", id="empty-raw"),
    pytest.param(b"\0" * 101, 0, 0, "image data is 101 bytes; the limit is 100", id="too-many-bytes"),
    pytest.param(b"hello, world", 0, 0, "image data is not a valid PNG or JPEG image", id="text"),
    pytest.param(b"\x89PNG\r\n\x1a\n", 0, 0, "image data is not a valid PNG or JPEG image",
                 id="png-signature-only"),
    pytest.param(b"\xff\xd8\xff", 0, 0, "image data is not a valid PNG or JPEG image", id="jpeg-marker-only"),
    pytest.param(encode(NOISE, "GIF"), 0, 0, "image data is not a valid PNG or JPEG image", id="gif"),
    pytest.param(encode(NOISE, "BMP"), 0, 0, "image data is not a valid PNG or JPEG image", id="bmp"),
    pytest.param(encode(NOISE, "TIFF"), 0, 0, "image data is not a valid PNG or JPEG image", id="tiff"),
    pytest.param(encode(NOISE, "WEBP"), 0, 0, "image data is not a valid PNG or JPEG image", id="webp"),
    pytest.param(png_header_only(0, 8), 0, 0, "image data is not a valid PNG or JPEG image", id="png-zero-width"),
    pytest.param(NOISE_PNG[:20] + bytes([NOISE_PNG[20] ^ 1]) + NOISE_PNG[21:], 0, 0,
                 "image data is not a valid PNG or JPEG image", id="png-header-bad-crc"),
    pytest.param(NOISE_PNG[: len(NOISE_PNG) // 2], 0, 0, "image data is corrupt or truncated", id="png-truncated"),
    pytest.param(NOISE_PNG[:60] + bytes([NOISE_PNG[60] ^ 0xFF]) + NOISE_PNG[61:], 0, 0,
                 "image data is corrupt or truncated", id="png-data-bad-crc"),
    pytest.param(NOISE_JPEG[: len(NOISE_JPEG) // 2], 0, 0, "image data is corrupt or truncated",
                 id="jpeg-truncated"),
    pytest.param(NOISE_JPEG[:200], 0, 0, "image header is corrupt", id="jpeg-header-cut"),
    pytest.param(png_header_only(65, 1), 0, 0, "image is 65x1 pixels; the limit is 64x64", id="png-too-wide"),
    pytest.param(png_header_only(20_000, 20_000), 0, 0, "image declares too many pixels; the limit is 64x64",
                 id="png-decompression-bomb"),
    pytest.param(png_header_only(10_000, 10_000), 0, 0, "image declares too many pixels; the limit is 64x64",
                 id="png-bomb-warning-range"),
    pytest.param(b"\0" * 64, 8, 0, "width and height must both be positive for raw grayscale pixels "
                 "(or both 0 for an encoded PNG/JPEG)", id="raw-height-missing"),
    pytest.param(b"\0" * 64, 0, 8, "width and height must both be positive for raw grayscale pixels "
                 "(or both 0 for an encoded PNG/JPEG)", id="raw-width-missing"),
    pytest.param(b"\0" * 64, -8, -8, "width and height must both be positive for raw grayscale pixels "
                 "(or both 0 for an encoded PNG/JPEG)", id="raw-negative"),
    pytest.param(b"\0" * 63, 8, 8, "raw grayscale data must be width*height = 64 bytes, got 63",
                 id="raw-short"),
    pytest.param(NOISE_PNG, 8, 8, f"raw grayscale data must be width*height = 64 bytes, got {len(NOISE_PNG)}",
                 id="png-sent-as-raw"),
    pytest.param(b"\0" * 65, 65, 1, "image is 65x1 pixels; the limit is 64x64", id="raw-too-wide"),
    pytest.param(b"\0", 2**31 - 1, 2**31 - 1, "image is 2147483647x2147483647 pixels; the limit is 64x64",
                 id="raw-int32-max"),
]
SMALL_LIMITS = ImageLimits(max_bytes=100_000, max_width=64, max_height=64)


@pytest.mark.parametrize(("data", "width", "height", "message"), BAD_IMAGES)
def test_bad_image_is_invalid_argument(data: bytes, width: int, height: int, message: str) -> None:
    """Empty, oversize, corrupt, truncated, unsupported or inconsistent image data is refused with
    a message of our own saying what was wrong."""
    limits = ImageLimits(max_bytes=100, max_width=64, max_height=64) if len(data) == 101 else SMALL_LIMITS
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, width, height, limits)
    assert caught.value.message == message


def test_default_limits_refuse_above_4096() -> None:
    """By default an image above 4096x4096 is refused from its header, before decoding."""
    with pytest.raises(InvalidArgument) as caught:
        decode_image(png_header_only(4097, 16))
    assert caught.value.message == "image is 4097x16 pixels; the limit is 4096x4096"


def gray16_png(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.uint16)))


GOOD_IMAGES = [
    pytest.param(encode(Image.new("L", (8, 8), 200)), id="png-gray"),
    pytest.param(encode(Image.new("1", (8, 8), 1)), id="png-bilevel"),
    pytest.param(encode(Image.new("LA", (8, 8), (200, 128))), id="png-gray-alpha"),
    pytest.param(encode(Image.new("RGB", (8, 8), (200, 10, 10))), id="png-rgb"),
    pytest.param(encode(Image.new("RGBA", (8, 8), (200, 10, 10, 128))), id="png-rgba"),
    pytest.param(encode(Image.new("RGB", (8, 8), (200, 10, 10)).quantize(4)), id="png-palette"),
    pytest.param(encode(Image.new("RGB", (8, 8), (200, 10, 10)).quantize(4), transparency=0),
                 id="png-palette-transparency"),
    pytest.param(gray16_png(np.full((8, 8), 40_000)), id="png-16-bit-gray"),
    pytest.param(encode(Image.new("L", (8, 8), 200), "JPEG"), id="jpeg-gray"),
    pytest.param(encode(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"), id="jpeg-rgb"),
    pytest.param(encode(Image.new("CMYK", (8, 8), (0, 50, 50, 0)), "JPEG"), id="jpeg-cmyk"),
]


@pytest.mark.parametrize("data", GOOD_IMAGES)
@pytest.mark.parametrize("config", [GRAY8, RGB4], ids=["to-gray-8x8", "to-rgb-4x4"])
def test_png_and_jpeg_modes_become_model_input(data: bytes, config: ModelConfig) -> None:
    """Every PNG/JPEG pixel mode converts to the model's colour mode and size without warnings."""
    x = prepare(data, 0, 0, config)
    assert x.dtype == np.float32
    assert x.shape == config.input_shape(1)
    assert 0.0 <= x.min() <= x.max() <= 1.0


def test_16_bit_gray_is_scaled_not_clipped() -> None:
    """16-bit grayscale samples are scaled to 8 bits (Pillow's plain conversion would clip at 255)."""
    values = np.array([[0, 257, 32_896, 65_535]])
    img = decode_image(gray16_png(values))
    x = image_to_input(img, replace(GRAY8, width=4, height=1))
    np.testing.assert_array_equal(x * 255, [[0, 1, 128, 255]])


def test_raw_grayscale_equals_png() -> None:
    """Raw 8-bit pixels with width and height give the same input as a PNG of the same pixels."""
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    raw = prepare(pixels.tobytes(), 8, 8, GRAY8)
    png = prepare(encode(Image.fromarray(pixels, mode="L")), 0, 0, GRAY8)
    np.testing.assert_array_equal(raw, png)
    np.testing.assert_allclose(raw, pixels.reshape(1, 64) / 255, rtol=1e-6)


def test_jpeg_exif_orientation_is_applied() -> None:
    """A JPEG stored sideways with an EXIF orientation tag is turned upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img = decode_image(encode(Image.new("L", (16, 8), 255), "JPEG", exif=exif))
    assert img.size == (8, 16)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        pytest.param(Layout.FLAT, (1, 48), id="flat"),
        pytest.param(Layout.NCHW, (1, 3, 4, 4), id="nchw"),
        pytest.param(Layout.NHWC, (1, 4, 4, 3), id="nhwc"),
    ],
)
def test_layout_and_per_channel_normalisation(layout: Layout, shape: tuple[int, ...]) -> None:
    """Input is (pixel * scale - mean[c]) / std[c], channels in RGB order, laid out per config."""
    config = replace(RGB4, layout=layout, mean=(0.5, 0.0, 0.25), std=(0.25, 1.0, 0.5))
    x = prepare(encode(Image.new("RGB", (4, 4), (255, 0, 51))), 0, 0, config)
    assert x.shape == shape
    per_channel = {Layout.FLAT: x.reshape(16, 3), Layout.NCHW: x[0].reshape(3, 16).T,
                   Layout.NHWC: x[0].reshape(16, 3)}[layout]
    np.testing.assert_allclose(per_channel, np.tile([2.0, 0.0, -0.1], (16, 1)), atol=1e-6)


def test_downscale_averages_boxes() -> None:
    """Shrinking averages each source block (BOX), so no detail is aliased away."""
    big = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, np.ones((2, 2), dtype=np.uint8))
    big[0, 0] = 0
    big[0, 1] = 8  # the top-left 2x2 block still averages to 4 * 0 + 2 = 2
    x = prepare(encode(Image.fromarray(big, mode="L")), 0, 0, GRAY8)
    expected = (np.arange(64) * 4).astype(np.float32)
    expected[0] = 2
    np.testing.assert_allclose(x[0] * 255, expected, atol=1e-3)


def test_upscale_to_model_size() -> None:
    """A smaller image is enlarged to the model's size."""
    x = prepare(encode(Image.new("L", (3, 2), 255)), 0, 0, GRAY8)
    assert x.shape == (1, 64)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        pytest.param(np.zeros((1, 8, 8), dtype=np.float32), "pixels must be uint8, got float32", id="float"),
        pytest.param(np.zeros((1, 8, 7), dtype=np.uint8), "pixels must be shaped (N, 8, 8[, 1]), got (1, 8, 7, 1)",
                     id="wrong-size"),
        pytest.param(np.zeros((1, 8, 8, 3), dtype=np.uint8),
                     "pixels must be shaped (N, 8, 8[, 1]), got (1, 8, 8, 3)", id="wrong-channels"),
    ],
)
def test_pixels_to_input_refuses_wrong_arrays(pixels: np.ndarray, message: str) -> None:
    """pixels_to_input refuses arrays that are not uint8 images of the model's size."""
    with pytest.raises(ValueError) as caught:
        pixels_to_input(pixels, GRAY8)
    assert str(caught.value) == message
