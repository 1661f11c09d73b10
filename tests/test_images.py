import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from uvd import records as R
from uvd.images import decode_image
from uvd.records import Item, RejectError
from uvd.recipe import FilterOptions, ImageOptions
from uvd.work import preprocess_item


def jpeg(array, quality=95):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def thirds(width, height):
    """Red | green | blue vertical bands."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 3, 0] = 255
    a[:, width // 3 : 2 * width // 3, 1] = 255
    a[:, 2 * width // 3 :, 2] = 255
    return a


def test_center_crop_keeps_the_middle_of_a_wide_image():
    # 768x256: the centre crop is exactly the green band.
    pixels, w, h = decode_image(png(thirds(768, 256)), ImageOptions(), FilterOptions())
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8 and (w, h) == (768, 256)
    assert pixels[:, 5:-5, 1].min() > 240 and pixels[:, 5:-5, 0].max() < 15 and pixels[:, 5:-5, 2].max() < 15


def test_plain_resize_keeps_everything():
    pixels, _, _ = decode_image(png(thirds(768, 256)), ImageOptions(resize="resize"), FilterOptions())
    assert pixels.shape == (256, 256, 3)
    assert pixels[128, 20, 0] > 240 and pixels[128, 128, 1] > 240 and pixels[128, 235, 2] > 240


def test_jpeg_draft_path_matches_full_decode():
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8))  # 1024² blocks
    pixels, w, h = decode_image(jpeg(base), ImageOptions(), FilterOptions())
    reference = np.asarray(Image.fromarray(base).resize((256, 256), Image.BICUBIC)).astype(int)
    assert (w, h) == (1024, 1024)
    assert np.abs(pixels.astype(int) - reference).mean() < 6


def test_grayscale_and_rgba_become_rgb():
    gray = np.full((300, 300), 77, np.uint8)
    pixels, _, _ = decode_image(png(gray), ImageOptions(), FilterOptions())
    assert pixels.shape == (256, 256, 3) and abs(int(pixels.mean()) - 77) <= 1
    rgba = Image.new("RGBA", (300, 300), (10, 20, 30, 128))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), ImageOptions(), FilterOptions())[0].shape == (256, 256, 3)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: b"", R.EMPTY_FILE),
        (lambda: b"<html><body>404 Not Found</body></html>", R.NOT_AN_IMAGE),
        (lambda: jpeg(thirds(600, 400))[:3000], R.TRUNCATED_IMAGE),
    ],
)
def test_bad_bytes_are_classified(make, reason):
    with pytest.raises(RejectError) as err:
        decode_image(make(), ImageOptions(), FilterOptions())
    assert err.value.reason == reason


def test_decompression_bomb_is_refused_from_the_header():
    data = png(np.zeros((600, 600, 3), np.uint8))
    with pytest.raises(RejectError) as err:
        decode_image(data, ImageOptions(max_pixels=500 * 500), FilterOptions())
    assert err.value.reason == R.DECOMPRESSION_BOMB


def test_filters():
    small = png(np.zeros((40, 100, 3), np.uint8))
    with pytest.raises(RejectError) as err:
        decode_image(small, ImageOptions(), FilterOptions(min_side=64))
    assert err.value.reason == R.TOO_SMALL
    wide = png(np.zeros((100, 500, 3), np.uint8))
    with pytest.raises(RejectError) as err:
        decode_image(wide, ImageOptions(), FilterOptions(max_aspect=3.0))
    assert err.value.reason == R.BAD_ASPECT
    assert decode_image(wide, ImageOptions(), FilterOptions())[0].shape == (256, 256, 3)


def test_preprocess_item_takes_files_and_raw_pixels_and_rejects_empty_data():
    raw = thirds(300, 200)
    encoded = Item("a", data=jpeg(thirds(512, 512)))
    pixels_a, width_a, height_a, digest_a = preprocess_item(encoded, ImageOptions(), FilterOptions())
    pixels_b, width_b, height_b, digest_b = preprocess_item(Item("b", array=raw), ImageOptions(), FilterOptions())
    assert pixels_a.shape == pixels_b.shape == (256, 256, 3) and pixels_a.dtype == pixels_b.dtype == np.uint8
    assert (width_a, height_a, width_b, height_b) == (512, 512, 300, 200)
    # the digest is of the input itself: the file's bytes, or the raw pixels
    assert digest_a == hashlib.sha256(encoded.data).digest()[:16]
    assert digest_b == hashlib.sha256(raw.tobytes()).digest()[:16] and digest_a != digest_b
    assert pixels_b[128, 128, 1] > 240 and pixels_b[128, 128, 0] < 15  # the centre crop of 300x200 is green
    with pytest.raises(RejectError) as err:
        preprocess_item(Item("c", data=b""), ImageOptions(), FilterOptions())
    assert err.value.reason == R.EMPTY_FILE


# ------------------------------------------------------------------ pixel modes: scaled, not clipped


def _rng_gray16(shape=(24, 40)):
    return np.random.default_rng(5).integers(0, 65536, shape).astype(np.uint16)


def _reference_modes():
    """(Pillow image of each accepted mode, its RGB conversion computed with numpy)."""
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    gray = rgb[:, :, 0]
    g16 = _rng_gray16()
    g16_rgb = np.repeat(np.rint(g16 / 257.0).astype(np.uint8)[:, :, None], 3, 2)
    cmyk = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.tobytes())
    floats = rng.random((24, 40)).astype(np.float32)
    wide = (g16.astype(np.int32) - 40000) * 3  # values far outside 16 bits: own range stretched
    stretched = np.rint((wide - wide.min()) * (255.0 / (wide.max() - wide.min()))).astype(np.uint8)
    bits = gray > 127
    return {
        "RGB": (Image.fromarray(rgb), rgb),
        "RGBA": (Image.fromarray(rgba, "RGBA"), rgba[:, :, :3]),
        "L": (Image.fromarray(gray), np.repeat(gray[:, :, None], 3, 2)),
        "LA": (Image.fromarray(rgba[:, :, :2].copy(), "LA"), np.repeat(rgba[:, :, :1], 3, 2)),
        "1": (Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, 2)),
        "P": (p, palette[index]),
        "CMYK": (
            Image.fromarray(cmyk, "CMYK"),
            np.rint((255 - cmyk[:, :, :3].astype(float)) * (255 - cmyk[:, :, 3:].astype(float)) / 255).astype(np.uint8),
        ),
        "I;16": (Image.fromarray(g16), g16_rgb),
        "I;16B": (Image.frombytes("I;16B", (40, 24), g16.astype(">u2").tobytes()), g16_rgb),
        "I;16L": (Image.frombytes("I;16L", (40, 24), g16.astype("<u2").tobytes()), g16_rgb),
        "I": (Image.fromarray(g16.astype(np.int32)), g16_rgb),
        "I wide": (Image.fromarray(wide.astype(np.int32)), np.repeat(stretched[:, :, None], 3, 2)),
        "F": (Image.fromarray(floats), np.repeat(np.rint(floats * 255.0).astype(np.uint8)[:, :, None], 3, 2)),
    }


@pytest.mark.parametrize("mode", list(_reference_modes()))
def test_every_accepted_mode_matches_a_numpy_reference(mode):
    from uvd.images import to_rgb

    img, reference = _reference_modes()[mode]
    out = np.asarray(to_rgb(img))
    assert out.shape == reference.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1, mode


def test_unsupported_mode_is_a_reject():
    from uvd.images import to_rgb
    from uvd.records import UNSUPPORTED_MODE

    with pytest.raises(RejectError) as err:
        to_rgb(Image.new("HSV", (4, 4)))
    assert err.value.reason == UNSUPPORTED_MODE


def test_16_bit_gray_png_is_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 512).astype(np.uint16), (512, 1))  # dark left, bright right
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    pixels, _, _ = decode_image(buf.getvalue(), ImageOptions(resize="resize"), FilterOptions())
    reference = np.linspace(0, 255, 256)
    assert np.abs(pixels[128, :, 0].astype(float) - reference).max() < 3
    assert pixels[:, :, 0].mean() == pytest.approx(127.5, abs=2)  # clipping would give ~255


def test_16_bit_rgb_png_keeps_its_range():
    from test_fuzz import png_raw

    g = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    data = png_raw(np.stack([g, 65535 - g, np.full_like(g, 32768)], -1).astype(">u2"), 16, 2)
    pixels, _, _ = decode_image(data, ImageOptions(), FilterOptions())
    assert np.abs(pixels[100, :, 0].astype(float) - np.linspace(0, 255, 256)).max() < 3
    assert np.abs(pixels[100, :, 1].astype(float) - np.linspace(255, 0, 256)).max() < 3
    assert abs(int(pixels[:, :, 2].mean()) - 128) <= 1


# ------------------------------------------------------------------ EXIF orientation


def _with_orientation(array, orientation, fmt="JPEG"):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _marked(width=400, height=300):
    """Black image, red block top-left, green block top-right: tells every orientation apart."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 4, : width // 4, 0] = 255
    a[: height // 4, -width // 4 :, 1] = 255
    return a


# What a viewer shows for each EXIF orientation of stored pixels `a` (numpy, per the EXIF spec).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse: the anti-diagonal mirror
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_before_resizing(orientation, fmt):
    from uvd.images import decode_file

    stored = _marked()
    upright = np.ascontiguousarray(UPRIGHT[orientation](stored))
    decoded = decode_file(_with_orientation(stored, orientation, fmt), ImageOptions(resize="resize"), FilterOptions())
    reference = np.asarray(Image.fromarray(upright).resize((256, 256), Image.BICUBIC)).astype(int)
    assert (decoded.width, decoded.height) == (upright.shape[1], upright.shape[0])
    assert decoded.orientation == orientation
    assert np.abs(decoded.pixels.astype(int) - reference).mean() < 4, orientation


def test_exif_orientation_matches_pillow_exif_transpose():
    from PIL import ImageOps

    from uvd.images import decode_file

    for orientation in range(1, 9):
        data = _with_orientation(_marked(), orientation, "PNG")
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        decoded = decode_file(data, ImageOptions(resize="resize"), FilterOptions())
        reference = np.asarray(upright.resize((256, 256), Image.BICUBIC)).astype(int)
        assert np.abs(decoded.pixels.astype(int) - reference).mean() < 2, orientation


def test_orientation_is_recorded_in_the_item_meta():
    turned = Item("turned", data=_with_orientation(_marked(), 6), meta={"url": "u"})
    plain = Item("plain", data=_with_orientation(_marked(), 1), meta={"url": "v"})
    _, w_turned, h_turned, _ = preprocess_item(turned, ImageOptions(), FilterOptions())
    _, w_plain, h_plain, _ = preprocess_item(plain, ImageOptions(), FilterOptions())
    assert turned.meta == {"url": "u", "exif_transposed": True, "exif_orientation": 6}
    assert plain.meta == {"url": "v"}
    assert (w_turned, h_turned) == (300, 400) and (w_plain, h_plain) == (400, 300)


def test_damaged_exif_keeps_the_image_upright_as_stored():
    data = bytearray(_with_orientation(_marked(), 6))
    start = data.index(b"Exif\x00\x00")
    data[start + 6 : start + 14] = b"XX\x00\x2a\xff\xff\xff\xff"  # bad byte order and IFD offset
    pixels, w, h = decode_image(bytes(data), ImageOptions(resize="resize"), FilterOptions())
    assert (w, h) == (400, 300) and pixels[10, 10, 0] > 200  # red block still top-left
