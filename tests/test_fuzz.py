"""Decode fuzzer: hostile bytes of every supported format never raise out of the decoder.

Seeded and small (a few thousand inputs, ~2 s): truncations at every offset class, random byte
flips, header fields overwritten with extreme values, and chunk/marker boundaries, over JPEG,
PNG, WebP, GIF and BMP files of many pixel modes. Each input must give a 256x256 RGB image or
an `RejectError` with a known reason, and `uvd.work.preprocess_item` (the runs' one decode path) must
account for every item.
"""
from __future__ import annotations

import functools
import hashlib
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uvd import records as R
from uvd.images import decode_file
from uvd.records import REASONS as REGISTERED, UNSUPPORTED_MODE, Item, RejectError
from uvd.recipe import FilterOptions, ImageOptions
from uvd.work import preprocess_item

REASONS = {
    R.EMPTY_FILE, R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.DECOMPRESSION_BOMB, UNSUPPORTED_MODE,
}
# A small pixel bound keeps a mutated header that claims a huge canvas from taking seconds.
OPTIONS = ImageOptions(max_pixels=2_000_000)
FILTERS = FilterOptions()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_raw(array: np.ndarray, bit_depth: int, color_type: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB)."""
    height, width = array.shape[:2]
    rows = b"".join(b"\0" + array[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def seed_files() -> dict[str, bytes]:
    """One small file per (format, mode) the decoder supports (built once; do not modify)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    other = rgb.rotate(90, expand=True).resize((56, 40))
    gray16 = rng.integers(0, 65536, (40, 56)).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "jpeg_rgb": _save(rgb, "JPEG", quality=80),
        "jpeg_progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg_gray": _save(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg_exif": _save(rgb, "JPEG", exif=exif.tobytes()),
        "png_rgb": _save(rgb, "PNG"),
        "png_rgba": _save(rgb.convert("RGBA"), "PNG"),
        "png_gray": _save(rgb.convert("L"), "PNG"),
        "png_la": _save(rgb.convert("LA"), "PNG"),
        "png_palette": _save(rgb.convert("P"), "PNG", transparency=3),
        "png_1bit": _save(rgb.convert("1"), "PNG"),
        "png_gray16": _save(Image.fromarray(gray16), "PNG"),
        "png_rgb16": png_raw(np.stack([gray16, gray16[::-1], gray16[:, ::-1]], -1).astype(">u2"), 16, 2),
        "png_exif": _save(rgb, "PNG", exif=exif.tobytes()),
        "webp_lossy": _save(rgb, "WEBP", quality=70),
        "webp_lossless": _save(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp_animated": _save(rgb, "WEBP", save_all=True, append_images=[other]),
        "gif": _save(rgb.convert("P"), "GIF"),
        "gif_animated": _save(rgb.convert("P"), "GIF", save_all=True, append_images=[other.convert("P")], duration=50),
        "bmp_rgb": _save(rgb, "BMP"),
        "bmp_palette": _save(rgb.convert("P"), "BMP"),
        "bmp_gray": _save(rgb.convert("L"), "BMP"),
    }
    return files


def boundaries(data: bytes) -> list[int]:
    """Offsets where a structure starts: JPEG markers, PNG/WebP chunks."""
    offsets = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
    if data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 8 <= len(data):
            offsets.append(pos)
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    if data.startswith(b"RIFF"):
        pos = 12
        while pos + 8 <= len(data):
            offsets.append(pos)
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little") + 1 & ~1
    return sorted(set(offsets))


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """Hostile variants of one file."""
    n = len(data)
    cuts = set(range(0, min(n, 48)))  # every offset through the header
    for b in boundaries(data):
        cuts.update(c for c in (b - 1, b, b + 1, b + 2, b + 4, b + 8) if 0 <= c < n)
    cuts.update(rng.randrange(n) for _ in range(12))  # inside the pixel data
    cuts.update((n // 2, n - 2, n - 1))
    out = [data[:c] for c in sorted(cuts)]
    for _ in range(40):  # random flips anywhere
        d = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            d[rng.randrange(n)] = rng.randrange(256)
        out.append(bytes(d))
    for _ in range(40):  # flips in the header
        d = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            d[rng.randrange(min(n, 64))] = rng.randrange(256)
        out.append(bytes(d))
    for offset in range(0, min(n, 48) - 1, 2):  # header fields set to extreme values
        for value in (b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x00\x01"):
            out.append(data[:offset] + value + data[offset + 2 :])
    for b in rng.sample(boundaries(data), min(6, len(boundaries(data)))):  # a segment length set to extremes
        for value in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x02"):
            out.append(data[: b + 2] + value + data[b + 6 :])
    return out


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, bytes]]:
    rng = random.Random(1234)
    return [(name, m) for name, data in seed_files().items() for m in mutations(data, rng)]


def test_every_seed_file_decodes():
    for name, data in seed_files().items():
        decoded = decode_file(data, OPTIONS, FILTERS)
        assert decoded.pixels.shape == (256, 256, 3) and decoded.pixels.dtype == np.uint8, name
        assert (decoded.width, decoded.height) == ((40, 56) if "exif" in name else (56, 40)), name


def test_no_exception_leaves_the_decoder(corpus):
    assert len(corpus) > 4000  # the fuzzer covers what it claims
    outcomes = {"image": 0, **{r: 0 for r in REASONS}}
    for name, data in corpus:
        try:
            decoded = decode_file(data, OPTIONS, FILTERS)
        except RejectError as err:
            assert err.reason in REASONS, (name, err.reason, err.detail)
            assert err.detail, name
            outcomes[err.reason] += 1
        else:
            assert decoded.pixels.shape == (256, 256, 3) and decoded.pixels.dtype == np.uint8, name
            outcomes["image"] += 1
    # every class of outcome is reached: the mutations really are hostile
    assert all(outcomes[r] > 0 for r in ("image", R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.EMPTY_FILE))


def test_preprocess_item_accounts_for_every_item(corpus):
    """Every input ends as pixels or as a reject whose reason is registered: no other exception
    leaves the production decode path, and a decoded item's digest is that of its bytes."""
    items = [Item(f"{name}/{i}", data=data, meta={}) for i, (name, data) in enumerate(corpus[::7])]
    outcomes = {"pixels": 0, "reject": 0}
    for item in items:
        try:
            pixels, width, height, digest = preprocess_item(item, OPTIONS, FILTERS)
        except RejectError as err:
            assert err.reason in REASONS and err.reason in REGISTERED, (item.key, err.reason)
            assert err.detail, item.key
            outcomes["reject"] += 1
        else:
            assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8, item.key
            assert width > 0 and height > 0 and digest == hashlib.sha256(item.data).digest()[:16], item.key
            outcomes["pixels"] += 1
    assert outcomes["pixels"] + outcomes["reject"] == len(items) > 500
    assert outcomes["pixels"] > 0 and outcomes["reject"] > 0  # both ends are reached


def test_jpeg_cut_after_8_bytes_is_truncated():
    data = seed_files()["jpeg_rgb"]
    for cut in (3, 8, 12, 20):
        with pytest.raises(RejectError) as err:
            decode_file(data[:cut], OPTIONS, FILTERS)
        assert err.value.reason == R.TRUNCATED_IMAGE, (cut, err.value.detail)


def test_png_cut_inside_ihdr_is_truncated():
    data = seed_files()["png_rgb"]
    assert data[12:16] == b"IHDR"
    for cut in range(8, 33):  # after the signature, through the end of IHDR
        with pytest.raises(RejectError) as err:
            decode_file(data[:cut], OPTIONS, FILTERS)
        assert err.value.reason == R.TRUNCATED_IMAGE, (cut, err.value.detail)


def test_cut_signatures_of_each_format_are_truncated_not_foreign():
    files = seed_files()
    for name in ("gif", "bmp_rgb", "webp_lossy"):
        data = files[name]
        with pytest.raises(RejectError) as err:
            decode_file(data[:10], OPTIONS, FILTERS)
        assert err.value.reason == R.TRUNCATED_IMAGE, name
    with pytest.raises(RejectError) as err:
        decode_file(b"GIF is a nice format, says this text file", OPTIONS, FILTERS)
    assert err.value.reason == R.NOT_AN_IMAGE


@pytest.mark.parametrize("error", [
    OSError("broken data stream"), OSError("Truncated File Read"), ValueError("bad"), SyntaxError("bad"),
    struct.error("unpack requires a buffer"), EOFError(), IndexError("x"), KeyError("x"), TypeError("x"),
    ZeroDivisionError("x"), OverflowError("x"), NotImplementedError("x"), AssertionError("x"), MemoryError(),
    Image.DecompressionBombError("x"),
])
@pytest.mark.parametrize("stage", ["open", "load"])
def test_each_exception_class_a_decoder_raises_is_a_reject(monkeypatch, error, stage):
    """Each class seen from Pillow's plugins on hostile bytes, raised at header or pixel time."""
    from PIL import ImageFile

    def fail(*args, **kwargs):
        raise error

    if stage == "open":
        monkeypatch.setattr(Image, "open", fail)
    else:
        monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(RejectError) as err:
        decode_file(seed_files()["png_rgb"], OPTIONS, FILTERS)
    expected = {
        "open": R.CORRUPT_IMAGE,
        "load": R.TRUNCATED_IMAGE if isinstance(error, EOFError) or "Truncated" in str(error) else (
            R.DECOMPRESSION_BOMB if isinstance(error, Image.DecompressionBombError) else R.CORRUPT_IMAGE),
    }[stage]
    assert err.value.reason == expected and type(error).__name__ in err.value.detail
