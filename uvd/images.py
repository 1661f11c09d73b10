"""Shared image preprocessing: bytes or pixels -> 256x256 RGB uint8, or a reject reason.

Runs, tokenizer training and the tests decode each item with `decode_file` / `resize_array` through
`uvd.work.preprocess_item`, the one decode path. No exception a hostile file can raise in a decoder
leaves this module: each becomes a `RejectError` with a reason (tests/test_fuzz.py).
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvd import records as R
from uvd.recipe import FilterOptions, ImageOptions
from uvd.records import RejectError

# We enforce our own pixel bound (recipe image.max_pixels) from the header, before decoding.
Image.MAX_IMAGE_PIXELS = None

# What Pillow's decoders raise on hostile bytes (found by fuzzing mutated headers and
# truncations of every format: tests/test_fuzz.py). ArithmeticError covers ZeroDivisionError
# and OverflowError, RuntimeError NotImplementedError, LookupError IndexError and KeyError.
DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, struct.error, EOFError, LookupError, TypeError, AttributeError,
    ArithmeticError, RuntimeError, AssertionError, MemoryError, Image.DecompressionBombError,
)

# Pillow modes we convert to RGB, and how: 16- and 32-bit and float modes are scaled (never
# clipped), the rest go through Pillow's own conversion.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
PILLOW_CONVERTED_MODES = ("1", "L", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB")
ACCEPTED_MODES = ("RGB", *PILLOW_CONVERTED_MODES, *HIGH_BIT_DEPTH_MODES)

# EXIF orientation tag value -> the transpose that shows the image upright (as ImageOps.exif_transpose).
EXIF_ORIENTATION_TAG = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# The name uvd/work.py still imports (owned by the runner work; to switch to RejectError there).
ImageRejected = RejectError


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # size before preprocessing, as displayed (after EXIF orientation)
    height: int
    orientation: int = 1  # the EXIF orientation applied (1: none)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]


def header_cut_short(data: bytes) -> str | None:
    """The format whose signature `data` starts with when the data ends inside that format's
    header (so a decoder cannot even read the image size), else None."""
    n = len(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG" if n < 33 else None  # signature (8) + IHDR chunk (4 + 4 + 13 + 4)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF" if n < 13 else None  # header (6) + logical screen descriptor (7)
    if data.startswith(b"BM"):
        return "BMP" if n < 26 else None  # file header (14) + smallest DIB header (12)
    if data.startswith(b"RIFF") and b"WEBP".startswith(data[8:12]):  # a RIFF cut before its kind is read too
        return "WebP" if n < 30 else None  # RIFF header (12) + chunk header (8) + frame header (10)
    if data.startswith(b"\xff\xd8"):
        return "JPEG" if not _jpeg_has_frame_header(data) else None
    return None


def _jpeg_has_frame_header(data: bytes) -> bool:
    """Walk the JPEG marker segments: does a whole SOFn segment (which holds the size) fit in `data`?"""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True  # not a clean marker stream: corrupt rather than cut short
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return pos + 2 + length <= len(data)
        if marker == 0xDA:
            return True  # scan before any frame header: corrupt, not cut short
        pos += 2 + length
    return False


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open `data` (reading only its header), classifying every failure as a reject reason."""
    if not data:
        raise RejectError(R.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except DECODE_ERRORS as err:
        cut = header_cut_short(data)
        if cut:
            raise RejectError(R.TRUNCATED_IMAGE, f"{cut} data ends inside its header ({len(data)} bytes)") from None
        if isinstance(err, UnidentifiedImageError):
            raise RejectError(R.NOT_AN_IMAGE, f"no image format recognised ({len(data)} bytes)") from None
        raise RejectError(R.CORRUPT_IMAGE, f"unreadable header: {_describe(err)}") from None
    if width <= 0 or height <= 0:
        raise RejectError(R.CORRUPT_IMAGE, f"header gives size {width}x{height}")
    if width * height > max_pixels:
        raise RejectError(R.DECOMPRESSION_BOMB, f"{width}x{height} is over image.max_pixels={max_pixels}")
    return img


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth gray pixels -> uint8 by linear scaling (never clipping).

    16-bit modes map [0, 65535] to [0, 255]; `I` (32-bit) does the same when its values fit in
    16 bits (16-bit PNG/TIFF/PGM data), else its own range is stretched; `F` maps [0, 1] to
    [0, 255] when it fits, else its own range."""
    v = values.astype(np.float64)
    v[~np.isfinite(v)] = 0.0
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = v * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = v * 255.0
    elif hi > lo:
        scaled = (v - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(v)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any accepted Pillow mode -> mode RGB (alpha is dropped)."""
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_BIT_DEPTH_MODES:
        gray = _scale_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode in PILLOW_CONVERTED_MODES:
        return img.convert("RGB")
    raise RejectError(R.UNSUPPORTED_MODE, f"pixel mode {img.mode!r} is not one of {', '.join(ACCEPTED_MODES)}")


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of a loaded image; 1 when absent, invalid or unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except DECODE_ERRORS:
        return 1  # a damaged EXIF block does not make the pixels wrong
    return value if isinstance(value, int) and value in ORIENTATION_TRANSPOSE else 1


def _decode_error(err: BaseException) -> RejectError:
    if isinstance(err, Image.DecompressionBombError):
        return RejectError(R.DECOMPRESSION_BOMB, _describe(err))
    if isinstance(err, EOFError) or (isinstance(err, OSError) and "truncated" in str(err).lower()):
        return RejectError(R.TRUNCATED_IMAGE, _describe(err))
    return RejectError(R.CORRUPT_IMAGE, _describe(err))


def load_pixels(img: Image.Image, size: int, mode: str) -> tuple[np.ndarray, int, int, int]:
    """Decode `img` (with JPEG DCT downscaling when it helps), turn it upright by its EXIF
    orientation and resize it -> ((size, size, 3) uint8, width, height as displayed, orientation)."""
    width, height = img.size
    if mode == "center_crop":
        scale = size / min(width, height)
    else:
        scale = max(size / width, size / height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the requested size.
            # The request is the same whatever the orientation (the scale depends on min/max side).
            img.draft("RGB", (max(size, int(width * scale + 0.5)), max(size, int(height * scale + 0.5))))
            img.load()
            orientation = exif_orientation(img)
            img = to_rgb(img)
            if orientation != 1:
                img = img.transpose(ORIENTATION_TRANSPOSE[orientation])
                if orientation >= 5:  # the transposing orientations swap the sides
                    width, height = height, width
            if mode == "center_crop":
                w, h = img.size
                s = size / min(w, h)
                new_w, new_h = max(size, round(w * s)), max(size, round(h * s))
                left, top = (new_w - size) / 2 / s, (new_h - size) / 2 / s
                box = (left, top, left + size / s, top + size / s)
                img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
            else:
                img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
            pixels = np.asarray(img, dtype=np.uint8)
    except RejectError:
        raise
    except DECODE_ERRORS as err:
        raise _decode_error(err) from None
    if pixels.shape != (size, size, 3):
        raise RejectError(R.CORRUPT_IMAGE, f"decoded to shape {pixels.shape}")
    return pixels, width, height, orientation


def check_filters(width: int, height: int, filters: FilterOptions) -> None:
    short, long = min(width, height), max(width, height)
    if filters.min_side and short < filters.min_side:
        raise RejectError(R.TOO_SMALL, f"{width}x{height}: shorter side below filters.min_side={filters.min_side}")
    if filters.max_aspect and long / max(short, 1) > filters.max_aspect:
        raise RejectError(
            R.BAD_ASPECT, f"{width}x{height}: aspect {long / max(short, 1):.2f} over filters.max_aspect={filters.max_aspect}"
        )


def decode_file(data: bytes, image: ImageOptions, filters: FilterOptions) -> DecodedImage:
    """Bytes of an image file -> a `DecodedImage`, or `RejectError` (never another exception)."""
    img = open_image(data, image.max_pixels)
    check_filters(*img.size, filters)  # size and aspect do not depend on the orientation
    pixels, width, height, orientation = load_pixels(img, image.size, image.resize)
    return DecodedImage(pixels, width, height, orientation)


def decode_image(data: bytes, image: ImageOptions, filters: FilterOptions) -> tuple[np.ndarray, int, int]:
    """Bytes of an image file -> ((size, size, 3) uint8, original width, original height)."""
    decoded = decode_file(data, image, filters)
    return decoded.pixels, decoded.width, decoded.height


def resize_array(array: np.ndarray, image: ImageOptions, filters: FilterOptions) -> tuple[np.ndarray, int, int]:
    """Decoded pixels (H, W, 3) uint8 -> ((size, size, 3) uint8, width, height)."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
        raise RejectError(R.CORRUPT_IMAGE, f"expected (H, W, 3) uint8 pixels, got {array.shape} {array.dtype}")
    height, width = array.shape[:2]
    check_filters(width, height, filters)
    return load_pixels(Image.fromarray(array), image.size, image.resize)[:3]
