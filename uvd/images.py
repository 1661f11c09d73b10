"""Shared image preprocessing: bytes or pixels -> 256x256 RGB uint8, or a reject reason.

Every source goes through `preprocess_batch` (a Ray Data stage); `decode_image` is the
single-image core, usable on its own.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvd import records as R
from uvd.recipe import FilterOptions, ImageOptions

# We enforce our own pixel bound (recipe image.max_pixels) from the header, before decoding.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode `data`, classifying every failure as a reject reason."""
    if not data:
        raise ImageRejected(R.EMPTY_FILE, "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageRejected(R.NOT_AN_IMAGE, str(err)[:200]) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(R.DECOMPRESSION_BOMB, f"{width}x{height} is over image.max_pixels={max_pixels}")
    return img


def load_pixels(img: Image.Image, size: int, mode: str) -> np.ndarray:
    """Decode `img` (with JPEG DCT downscaling when it helps) and resize it to (size, size, 3)."""
    width, height = img.size
    if mode == "center_crop":
        scale = size / min(width, height)
    else:
        scale = max(size / width, size / height)
    # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the requested size.
    img.draft("RGB", (max(size, int(width * scale + 0.5)), max(size, int(height * scale + 0.5))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = img.convert("RGB")
    except OSError as err:
        reason = R.TRUNCATED_IMAGE if "truncated" in str(err) else R.CORRUPT_IMAGE
        raise ImageRejected(reason, str(err)[:200]) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageRejected(R.CORRUPT_IMAGE, str(err)[:200]) from None
    if mode == "center_crop":
        w, h = img.size
        s = size / min(w, h)
        new_w, new_h = max(size, round(w * s)), max(size, round(h * s))
        left, top = (new_w - size) / 2 / s, (new_h - size) / 2 / s
        box = (left, top, left + size / s, top + size / s)
        img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
    else:
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def check_filters(width: int, height: int, filters: FilterOptions) -> None:
    short, long = min(width, height), max(width, height)
    if filters.min_side and short < filters.min_side:
        raise ImageRejected(R.TOO_SMALL, f"{width}x{height}: shorter side below filters.min_side={filters.min_side}")
    if filters.max_aspect and long / max(short, 1) > filters.max_aspect:
        raise ImageRejected(
            R.BAD_ASPECT, f"{width}x{height}: aspect {long / max(short, 1):.2f} over filters.max_aspect={filters.max_aspect}"
        )


def decode_image(data: bytes, image: ImageOptions, filters: FilterOptions) -> tuple[np.ndarray, int, int]:
    """Bytes of an image file -> ((size, size, 3) uint8, original width, original height)."""
    img = open_image(data, image.max_pixels)
    width, height = img.size
    check_filters(width, height, filters)
    return load_pixels(img, image.size, image.resize), width, height


def resize_array(array: np.ndarray, image: ImageOptions, filters: FilterOptions) -> tuple[np.ndarray, int, int]:
    """Decoded pixels (H, W, 3) uint8 -> ((size, size, 3) uint8, width, height)."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ImageRejected(R.CORRUPT_IMAGE, f"expected (H, W, 3) uint8 pixels, got {array.shape} {array.dtype}")
    height, width = array.shape[:2]
    check_filters(width, height, filters)
    return load_pixels(Image.fromarray(array), image.size, image.resize), width, height


def preprocess_batch(batch: dict[str, np.ndarray], image: ImageOptions, filters: FilterOptions) -> dict[str, np.ndarray]:
    """Ray Data stage: rows with `data` (file bytes, or raw pixels when `raw_shape` is set)
    -> rows with `pixels` (B, size, size, 3), `hash`, `width`, `height`; failures set `reject`."""
    n = len(batch["key"])
    pixels = np.zeros((n, image.size, image.size, 3), dtype=np.uint8)
    hashes = np.empty(n, dtype=object)
    widths = np.zeros(n, dtype=np.int64)
    heights = np.zeros(n, dtype=np.int64)
    reject = batch["reject"].astype(object)
    detail = batch["detail"].astype(object)
    for i in range(n):
        hashes[i] = ""
        if reject[i] or batch["end"][i]:
            continue
        data = batch["data"][i]
        shape = json.loads(batch["raw_shape"][i]) if batch["raw_shape"][i] else None
        try:
            if shape:
                array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
                pixels[i], widths[i], heights[i] = resize_array(array, image, filters)
            else:
                pixels[i], widths[i], heights[i] = decode_image(data, image, filters)
            hashes[i] = content_hash(data)
        except ImageRejected as err:
            reject[i], detail[i] = err.reason, err.detail
    out = {k: v for k, v in batch.items() if k not in ("data", "raw_shape")}
    out.update(pixels=pixels, hash=hashes, width=widths, height=heights, reject=reject, detail=detail)
    return out
