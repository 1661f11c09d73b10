import io

import numpy as np
import pytest
from PIL import Image

from uvd import records as R
from uvd.images import ImageRejected, decode_image, preprocess_batch
from uvd.recipe import FilterOptions, ImageOptions


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
    with pytest.raises(ImageRejected) as err:
        decode_image(make(), ImageOptions(), FilterOptions())
    assert err.value.reason == reason


def test_decompression_bomb_is_refused_from_the_header():
    data = png(np.zeros((600, 600, 3), np.uint8))
    with pytest.raises(ImageRejected) as err:
        decode_image(data, ImageOptions(max_pixels=500 * 500), FilterOptions())
    assert err.value.reason == R.DECOMPRESSION_BOMB


def test_filters():
    small = png(np.zeros((40, 100, 3), np.uint8))
    with pytest.raises(ImageRejected) as err:
        decode_image(small, ImageOptions(), FilterOptions(min_side=64))
    assert err.value.reason == R.TOO_SMALL
    wide = png(np.zeros((100, 500, 3), np.uint8))
    with pytest.raises(ImageRejected) as err:
        decode_image(wide, ImageOptions(), FilterOptions(max_aspect=3.0))
    assert err.value.reason == R.BAD_ASPECT
    assert decode_image(wide, ImageOptions(), FilterOptions())[0].shape == (256, 256, 3)


def _batch(rows):
    keys = ["key", "data", "raw_shape", "reject", "detail", "end"]
    return {k: np.array([r[k] for r in rows], dtype=object if k != "end" else bool) for k in keys}


def test_preprocess_batch_mixes_files_raw_pixels_and_rejects():
    raw = thirds(300, 200)
    rows = [
        dict(key="a", data=jpeg(thirds(512, 512)), raw_shape="", reject="", detail="", end=False),
        dict(key="b", data=raw.tobytes(), raw_shape="[200, 300, 3]", reject="", detail="", end=False),
        dict(key="c", data=b"", raw_shape="", reject="", detail="", end=False),
        dict(key="d", data=b"", raw_shape="", reject=R.DOWNLOAD_FAILED, detail="404", end=False),
    ]
    out = preprocess_batch(_batch(rows), ImageOptions(), FilterOptions())
    assert out["pixels"].shape == (4, 256, 256, 3)
    assert list(out["reject"]) == ["", "", R.EMPTY_FILE, R.DOWNLOAD_FAILED]
    assert list(out["width"][:2]) == [512, 300] and list(out["height"][:2]) == [512, 200]
    assert len(out["hash"][0]) == 64 and out["hash"][0] != out["hash"][1]
    assert "data" not in out and out["pixels"][1, 128, 128, 1] > 240
