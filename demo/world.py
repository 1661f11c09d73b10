"""A small sample world on disk, in the real input formats, for `uvd demo` and the tests.

`build_laion_world` writes img2dataset webdataset shards (`00000.tar` + `.parquet` +
`_stats.json`), `build_imagenet_world` an ImageNet train tree (`<wnid>/<wnid>_<n>.JPEG`).
Both plant known-bad inputs and return a manifest of what a correct pipeline must do with
every input: how many images come out, and which keys are rejected for which reason.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from uvd.pipelines.laion import BAD_METADATA, DUPLICATE_KEY, UNKNOWN_STATUS, UNSUPPORTED_MEMBER
from uvd import records as R

logger = logging.getLogger(__name__)

REJECT_REASONS = (
    R.DOWNLOAD_FAILED, UNSUPPORTED_MEMBER, DUPLICATE_KEY, UNKNOWN_STATUS, BAD_METADATA, R.EMPTY_FILE,
    R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.TOO_SMALL, R.BAD_ASPECT, R.DUPLICATE,
)
JPEG_QUALITY = 90
MTIME = 1_700_000_000  # fixed tar mtime (2023-11-14) so shards are byte-identical per seed
TRUNCATE_FRACTION = 0.6
NUM_SAMPLE_DIGITS = 4  # img2dataset oom_sample_per_shard for number_sample_per_shard=10000
NUM_SHARD_DIGITS = 5  # img2dataset default oom_shard_count

# img2dataset's parquet/json fields with caption_col set, extract_exif and compute_hash="sha256",
# in its order: input columns (caption, url), then the downloader's own.
LAION_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("caption", "url", "key", "status", "error_message")]
    + [(name, pa.int32()) for name in ("width", "height", "original_width", "original_height")]
    + [("exif", pa.string()), ("sha256", pa.string())]
)

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n"
)
DOWNLOAD_ERRORS = ("HTTP Error 404: Not Found", "<urlopen error [Errno -2] Name or service not known>")

# skimage.data photos (all ship with scikit-image, no download) and LAION-style captions.
PHOTO_CAPTIONS = {
    "astronaut": "astronaut Eileen Collins in an orange flight suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat named Chelsea looking at the camera",
    "rocket": "a rocket on the launch pad before liftoff",
    "motorcycle": "a red motorcycle parked in a garage",
    "camera": "black and white photo of a man with a film camera",
    "coins": "old coins on a table, greyscale",
    "hubble_deep_field": "Hubble deep field image full of galaxies",
    "immunohistochemistry": "microscope slide, immunohistochemistry staining",
    "retina": "fundus photograph of a human retina",
    "clock": "a wall clock, black and white",
    "brick": "close-up of a brick wall texture",
    "grass": "grass texture, top view",
    "gravel": "gravel texture background",
    "colorwheel": "a color wheel",
    "moon": "surface of the moon, greyscale",
    "cell": "cells under a microscope",
}
CAPTION_STYLES = ("{}", "photo of {}", "{}, high resolution", "stock image: {}", "{} | free download")


@dataclass(frozen=True)
class ShapeStyle:
    """How to draw a generated image: background gradient, a shape kind, its colours."""

    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    shape: str  # ellipse, rectangle, polygon, fish, ball, disc, cone, arc
    colours: tuple[tuple[int, int, int], ...]
    count: tuple[int, int] = (1, 4)


# Real ImageNet classes; each draws from one base photo or one shape family so the
# images of a class look alike. The first six are the default world.
IMAGENET_CLASSES = (
    ("n01440764", "tench", ShapeStyle(((70, 86, 48), (28, 40, 22)), "fish", ((128, 116, 62), (96, 88, 44)), (1, 2))),
    ("n01443537", "goldfish", ShapeStyle(((40, 90, 170), (10, 30, 80)), "fish", ((250, 130, 20),), (1, 3))),
    ("n02123045", "tabby", "chelsea"),
    ("n03785016", "moped", "motorcycle"),
    ("n04266014", "space shuttle", "rocket"),
    ("n07920052", "espresso", "coffee"),
    ("n04254680", "soccer ball", ShapeStyle(((60, 140, 50), (30, 90, 30)), "ball", ((245, 245, 245),), (1, 1))),
    ("n04326547", "stone wall", "brick"),
    ("n04548280", "wall clock", "clock"),
    ("n07747607", "orange", ShapeStyle(((90, 60, 40), (40, 25, 15)), "disc", ((245, 140, 20), (230, 120, 10)), (2, 5))),
    ("n07753592", "banana", ShapeStyle(((235, 230, 215), (200, 195, 180)), "arc", ((240, 210, 40),), (1, 3))),
    ("n09472597", "volcano", ShapeStyle(((120, 170, 230), (230, 200, 170)), "cone", ((80, 60, 50),), (1, 1))),
)


# ----------------------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 copy of a skimage.data photo; grey photos are stacked to RGB."""
    import skimage.data  # optional dependency (extra "demo"), only needed to build worlds

    if name == "motorcycle":
        array = skimage.data.stereo_motorcycle()[0]
    else:
        array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3], dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _available_photos() -> tuple[str, ...]:
    names = []
    for name in PHOTO_CAPTIONS:
        try:
            _load_photo(name)
        except (ImportError, AttributeError, OSError, ValueError) as err:  # missing data file or older skimage
            logger.warning("skimage photo %r unavailable, skipped: %s", name, err)
            continue
        names.append(name)
    if not names:
        raise ValueError("no skimage.data photo could be loaded; install scikit-image (pip install 'uvd[demo]')")
    return tuple(names)


def _random_size(rng: np.random.Generator, min_side: int, max_side: int, max_aspect: float) -> tuple[int, int]:
    """(width, height) with the long side in [min_side, max_side] and aspect <= max_aspect."""
    long = int(rng.integers(min_side, max_side + 1))
    aspect = float(rng.uniform(1.0, max_aspect))
    short = max(min_side, int(np.ceil(long / aspect)))
    return (long, short) if rng.random() < 0.7 else (short, long)


def _photo_variant(rng: np.random.Generator, name: str, width: int, height: int) -> Image.Image:
    """A random crop of a photo at the target aspect, flipped maybe, rescaled, colour-jittered."""
    base = _load_photo(name)
    base_h, base_w = base.shape[:2]
    aspect = width / height
    crop_w, crop_h = (base_h * aspect, base_h) if base_w / base_h > aspect else (base_w, base_w / aspect)
    scale = rng.uniform(0.55, 1.0)
    crop_w, crop_h = max(8, int(crop_w * scale)), max(8, int(crop_h * scale))
    left = int(rng.integers(0, base_w - crop_w + 1))
    top = int(rng.integers(0, base_h - crop_h + 1))
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.85, 1.15, size=3)
    return Image.fromarray(np.clip(np.asarray(img) * gain, 0, 255).astype(np.uint8))


def _gradient(rng: np.random.Generator, width: int, height: int, colours) -> np.ndarray:
    """(H, W, 3) float linear blend between two colours along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in colours)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, colour, width: int, height: int):
    size = min(width, height)
    r = rng.uniform(0.12, 0.35) * size
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    fill = tuple(int(c) for c in np.clip(np.asarray(colour) + rng.integers(-15, 16, 3), 0, 255))
    box = (cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r * rng.uniform(0.5, 1.0))
    if shape == "ellipse" or shape == "disc":
        draw.ellipse(box if shape == "ellipse" else (cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    elif shape == "polygon":
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fill)
    elif shape == "fish":  # body ellipse + tail triangle, facing left or right
        side = 1 if rng.random() < 0.5 else -1
        draw.ellipse((cx - r, cy - r * 0.45, cx + r, cy + r * 0.45), fill=fill)
        tail_x, fin_x = cx - side * r * 0.9, cx - side * r * 1.5
        draw.polygon([(tail_x, cy), (fin_x, cy - r * 0.4), (fin_x, cy + r * 0.4)], fill=fill)
        eye_x, eye_y = cx + side * r * 0.55, cy - r * 0.15
        draw.ellipse((eye_x - 4, eye_y - 4, eye_x + 4, eye_y + 4), fill=(10, 10, 10))
    elif shape == "ball":  # white disc with dark pentagon patches
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(20, 20, 20), width=2)
        for a in np.linspace(0, 2 * np.pi, 6)[:-1] + rng.uniform(0, 1):
            px, py, pr = cx + 0.6 * r * np.cos(a), cy + 0.6 * r * np.sin(a), 0.22 * r
            draw.regular_polygon((px, py, pr), 5, fill=(25, 25, 25))
        draw.regular_polygon((cx, cy, 0.22 * r), 5, fill=(25, 25, 25))
    elif shape == "cone":  # a volcano: wide dark cone, glowing crater
        base_y = height * rng.uniform(0.85, 1.0)
        peak_x, peak_y = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.25, 0.45)
        half = width * rng.uniform(0.35, 0.5)
        crater = 0.08 * width
        outline = [(peak_x - half, base_y), (peak_x - crater, peak_y), (peak_x + crater, peak_y), (peak_x + half, base_y)]
        draw.polygon(outline, fill=fill)
        draw.ellipse((peak_x - crater, peak_y - 8, peak_x + crater, peak_y + 8), fill=(255, 90, 20))
    elif shape == "arc":
        start, end = float(rng.uniform(0, 90)), float(rng.uniform(150, 220))
        draw.arc((cx - r, cy - r, cx + r, cy + r), start, end, fill=fill, width=max(6, int(r * 0.35)))
    else:
        raise AssertionError(f"unknown shape {shape!r}")


def _generated_image(rng: np.random.Generator, width: int, height: int, style: ShapeStyle) -> Image.Image:
    pixels = _gradient(rng, width, height, style.background)
    pixels += rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)  # faint grain, shared by channels
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(style.count[0], style.count[1] + 1))):
        colour = style.colours[int(rng.integers(len(style.colours)))]
        _draw_shape(draw, rng, style.shape, colour, width, height)
    return img


def _noise_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise: a tiny random image upscaled (cheap to encode, unlike pixel noise)."""
    cells = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.BICUBIC)


def _random_style(rng: np.random.Generator) -> ShapeStyle:
    colours = rng.integers(0, 256, size=(4, 3))
    background = (tuple(int(c) for c in colours[0]), tuple(int(c) for c in colours[1]))
    shape = ("ellipse", "rectangle", "polygon", "disc", "arc")[int(rng.integers(5))]
    return ShapeStyle(background, shape, (tuple(int(c) for c in colours[2]), tuple(int(c) for c in colours[3])), (1, 6))


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _decode_error(data: bytes) -> str | None:
    """What PIL says when fully decoding `data`, or None when it decodes cleanly."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except (OSError, ValueError, SyntaxError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _truncated_jpeg(jpeg: bytes) -> bytes:
    data = jpeg[: int(len(jpeg) * TRUNCATE_FRACTION)]
    error = _decode_error(data)
    if error is None or "truncated" not in error:
        raise RuntimeError(f"cutting a JPEG did not give PIL's truncation error (got {error!r})")
    return data


def _corrupt_jpeg(rng: np.random.Generator, jpeg: bytes) -> bytes:
    """Same length, headers intact, random bytes over part of the entropy-coded scan data."""
    sos = jpeg.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    num_garbage = max(64, (len(jpeg) - scan_start) // 10)
    for _ in range(20):  # a draw that PIL happens to decode is retried
        offset = int(rng.integers(scan_start + 16, len(jpeg) - num_garbage - 2))
        data = bytearray(jpeg)
        data[offset : offset + num_garbage] = rng.integers(0, 256, num_garbage, dtype=np.uint8).tobytes()
        error = _decode_error(bytes(data))
        if error is not None and "truncated" not in error:
            return bytes(data)
    raise RuntimeError("could not corrupt the JPEG so that PIL fails to decode it")


# ----------------------------------------------------------------------------- LAION (img2dataset)


def _laion_plan(rng: np.random.Generator, num_shards: int, images_per_shard: int) -> dict:
    """{(shard, index): (reason, duplicate source or None)}: where each broken input goes.

    Sample 0 of every shard stays good, so a duplicate always has an earlier original."""
    reasons = [
        R.DOWNLOAD_FAILED, R.DOWNLOAD_FAILED, R.EMPTY_FILE, R.NOT_AN_IMAGE,
        R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.TOO_SMALL, R.BAD_ASPECT,
    ]
    by_shard: dict[int, list] = {s: [] for s in range(num_shards)}
    for i, reason in enumerate(reasons):
        by_shard[i % num_shards].append((reason, None))
    by_shard[0].append((R.DUPLICATE, "same_shard"))
    by_shard[num_shards - 1].append((R.DUPLICATE, "first_shard"))  # across shards when there are 2+
    plan = {}
    for shard, entries in by_shard.items():
        if len(entries) > images_per_shard - 1:
            raise ValueError(
                f"images_per_shard={images_per_shard} is too small for the {len(entries)} broken inputs of shard "
                f"{shard}; use images_per_shard >= {len(entries) + 1}, more shards, or broken=False"
            )
        slots = np.sort(rng.choice(np.arange(1, images_per_shard), size=len(entries), replace=False))
        order = rng.permutation(len(entries))
        for slot, j in zip(slots, order):
            plan[(shard, int(slot))] = entries[j]
    # Duplicates copy a good sample: an earlier one of their shard, or one of shard 0.
    for (shard, index), (reason, where) in list(plan.items()):
        if reason != R.DUPLICATE:
            continue
        source_shard = shard if where == "same_shard" else 0
        limit = index if source_shard == shard else images_per_shard
        candidates = [i for i in range(limit) if (source_shard, i) not in plan]
        plan[(shard, index)] = (reason, (source_shard, int(rng.choice(candidates))))
    return plan


def _laion_sample(rng: np.random.Generator, photos: tuple[str, ...]) -> tuple[Image.Image, str]:
    """One good LAION-like image and its caption: a photo variant (60%), shapes or noise."""
    width, height = _random_size(rng, 200, 900, 2.5)
    pick = rng.random()
    if pick < 0.6:
        name = photos[int(rng.integers(len(photos)))]
        text = PHOTO_CAPTIONS[name]
        img = _photo_variant(rng, name, width, height)
    elif pick < 0.85:
        style = _random_style(rng)
        img = _generated_image(rng, width, height, style)
        text = f"abstract {style.shape}s on a colour gradient"
    else:
        img = _noise_image(rng, width, height)
        text = "blurry colorful background texture"
    return img, CAPTION_STYLES[int(rng.integers(len(CAPTION_STYLES)))].format(text)


def _broken_file(rng: np.random.Generator, reason: str, img: Image.Image) -> tuple[bytes, tuple]:
    """The bytes of one deliberately bad file, and the (width, height) its header claims."""
    if reason == R.EMPTY_FILE:
        return b"", (None, None)
    if reason == R.NOT_AN_IMAGE:
        return HTML_PAGE, (None, None)
    if reason == R.TRUNCATED_IMAGE:
        return _truncated_jpeg(_encode_jpeg(img)), img.size
    if reason == R.CORRUPT_IMAGE:
        return _corrupt_jpeg(rng, _encode_jpeg(img)), img.size
    if reason == R.TOO_SMALL:  # the pipeline's default min side is 64
        return _encode_jpeg(img.resize((40, 30), Image.BILINEAR)), (40, 30)
    if reason == R.BAD_ASPECT:  # 5:1, over the default max aspect 3.0
        return _encode_jpeg(img.resize((500, 100), Image.BILINEAR)), (500, 100)
    raise AssertionError(f"no broken file for reason {reason!r}")


def _write_tar(path: Path, members: list[tuple]) -> None:
    """Members in the given order, like webdataset's TarWriter but with a fixed mtime.
    A member is (name, bytes), or (name, tarfile.SYMTYPE or LNKTYPE, link target)."""
    with tarfile.open(path, "w") as tar:  # PAX, the default, as webdataset writes
        for name, data, *link in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = MTIME, 0o444
            info.uname = info.gname = "bigdata"
            if link:
                info.type, info.linkname = data, link[0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _empty_manifest(path: Path) -> dict:
    return {"path": str(path), "items": 0, "good": 0, "expected_rejects": {}, "keys_by_reason": {}}


def _add_reject(manifest: dict, reason: str, key: str) -> None:
    manifest["expected_rejects"][reason] = manifest["expected_rejects"].get(reason, 0) + 1
    manifest["keys_by_reason"].setdefault(reason, []).append(key)


def _sorted_reasons(manifest: dict) -> dict:
    """Reasons in the pipeline's order (download first, duplicate last), keys sorted."""
    order = {r: i for i, r in enumerate(REJECT_REASONS)}
    reasons = sorted(manifest["keys_by_reason"], key=order.__getitem__)
    manifest["expected_rejects"] = {r: manifest["expected_rejects"][r] for r in reasons}
    manifest["keys_by_reason"] = {r: sorted(manifest["keys_by_reason"][r]) for r in reasons}
    return manifest


def _prepare_root(root: Path) -> Path:
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty; build the demo world into a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _hostile_samples(
    seed: int, photos: tuple[str, ...], tar_name: str, good_key: str, keys: list[str]
) -> tuple[list, list, dict]:
    """Tar members and status rows that test the reader's accounting, appended to shard 0:
    the same file name in two folders (two good keys), a symlink and a hardlink image, a `.json`
    holding `null`, one in latin-1 (read, recorded), an unknown status (image not used), a
    second sample under an earlier key with another image, and a photo stored on its side with
    an EXIF orientation. -> (members, rows, {key: reason or None})."""
    members, rows, fate = [], [], {}

    def good(index: int, key: str, folder: str = "", latin1: bool = False, rotated: bool = False) -> None:
        rng = np.random.default_rng([seed, 1, index])
        img, caption = _laion_sample(rng, photos)
        data = _encode_jpeg(img)
        if rotated:  # stored on its side with EXIF orientation 6 (rotate 90° clockwise to view), as phones do
            exif = Image.Exif()
            exif[0x0112] = 6
            buf = io.BytesIO()
            img.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=JPEG_QUALITY, exif=exif)
            data = buf.getvalue()
        meta = {"caption": caption + (" \u00e9t\u00e9" if latin1 else ""),
                "url": f"https://hostile.example.com/{folder}{key}.jpg",
                "key": key, "status": "success", "error_message": None, "width": img.size[0], "height": img.size[1],
                "original_width": img.size[0], "original_height": img.size[1], "exif": None,
                "sha256": hashlib.sha256(data).hexdigest()}
        text = json.dumps(meta, indent=4, ensure_ascii=False)
        members.extend([
            (f"{folder}{key}.jpg", data),
            (f"{folder}{key}.json", text.encode("latin-1" if latin1 else "utf-8")),
            (f"{folder}{key}.txt", meta["caption"].encode()),
        ])

    good(0, keys[0], "a/")
    good(1, keys[0], "b/")
    fate[f"{tar_name}/a/{keys[0]}"] = fate[f"{tar_name}/b/{keys[0]}"] = None
    members += [
        (f"{keys[1]}.jpg", tarfile.SYMTYPE, f"{good_key}.jpg"), (f"{keys[1]}.txt", b"a symlinked image"),
        (f"{keys[2]}.jpg", tarfile.LNKTYPE, f"{good_key}.jpg"),
    ]
    fate[f"{tar_name}/{keys[1]}"] = fate[f"{tar_name}/{keys[2]}"] = UNSUPPORTED_MEMBER
    good(3, keys[3])
    members[-2] = (f"{keys[3]}.json", b"null")  # in place of its metadata
    fate[f"{tar_name}/{keys[3]}"] = BAD_METADATA
    good(4, keys[4], latin1=True)
    fate[f"{tar_name}/{keys[4]}"] = None
    good(5, keys[5])
    fate[f"{tar_name}/{keys[5]}"] = UNKNOWN_STATUS
    good(6, good_key)  # the key of a good sample of the shard, again, with another image
    fate[f"{tar_name}/{good_key}#2"] = DUPLICATE_KEY
    good(7, keys[6], rotated=True)
    fate[f"{tar_name}/{keys[6]}"] = None
    for i, key in enumerate(keys[1:7], start=1):
        status = "skipped_by_policy" if i == 5 else "success"  # not a status img2dataset writes
        rows.append({"caption": None, "url": f"https://hostile.example.com/{key}.jpg", "key": key, "status": status,
                     "error_message": None, "width": None, "height": None, "original_width": None,
                     "original_height": None, "exif": None, "sha256": None})
    return members, rows, fate


def build_laion_world(
    root: Path, num_shards: int = 2, images_per_shard: int = 40, seed: int = 0, broken: bool = True,
    hostile: bool = False,
) -> dict:
    """img2dataset output (`--output_format webdataset --caption_col ... --compute_hash sha256`) in `root`.

    Every shard has `images_per_shard` parquet rows; with `broken` ten of all rows are bad inputs
    (2 failed downloads, empty, HTML, truncated, corrupt, too small, 5:1, 2 duplicates). With
    `hostile`, shard 0 also gets the tar members of `_hostile_samples` (9 items, 5 rejected)."""
    if num_shards < 1 or images_per_shard < 1:
        raise ValueError(f"num_shards and images_per_shard must be >= 1, got {num_shards} and {images_per_shard}")
    root = _prepare_root(root)
    photos = _available_photos()
    plan = _laion_plan(np.random.default_rng([seed, 0]), num_shards, images_per_shard) if broken else {}
    manifest = _empty_manifest(root)
    manifest["shards"] = []
    jpegs: dict[tuple[int, int], tuple[bytes, tuple[int, int]]] = {}  # good samples, for duplicates
    for shard in range(num_shards):
        tar_name = f"{shard:0{NUM_SHARD_DIGITS}d}.tar"
        members, rows = [], []
        status_dict: dict[str, int] = {}
        for index in range(images_per_shard):
            rng = np.random.default_rng([seed, 0, shard, index])
            key = f"{shard * 10**NUM_SAMPLE_DIGITS + index:0{NUM_SHARD_DIGITS + NUM_SAMPLE_DIGITS}d}"
            reason, source = plan.get((shard, index), (None, None))
            img, caption = _laion_sample(rng, photos)
            data, size = None, (None, None)
            if reason is None:
                data, size = _encode_jpeg(img), img.size
                jpegs[(shard, index)] = (data, size)
            elif reason == R.DUPLICATE:
                data, size = jpegs[source]
                caption = f"{caption} (repost)"
            elif reason != R.DOWNLOAD_FAILED:
                data, size = _broken_file(rng, reason, img)
            meta = {
                "caption": caption,
                "url": f"https://img{int(rng.integers(1, 9))}.example.com/laion/{shard}/{key}.jpg",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": size[0],
                "height": size[1],
                "original_width": size[0],
                "original_height": size[1],
                "exif": None,
                "sha256": None,
            }
            if reason == R.DOWNLOAD_FAILED:
                error = DOWNLOAD_ERRORS[len(manifest["keys_by_reason"].get(reason, [])) % len(DOWNLOAD_ERRORS)]
                meta.update(status="failed_to_download", error_message=error)
                status_dict[error] = status_dict.get(error, 0) + 1
            else:
                meta["sha256"] = hashlib.sha256(data).hexdigest()
                status_dict["success"] = status_dict.get("success", 0) + 1
                # webdataset's TarWriter writes a sample's members in sorted extension order.
                members += [
                    (f"{key}.jpg", data),
                    (f"{key}.json", json.dumps(meta, indent=4).encode()),
                    (f"{key}.txt", caption.encode()),
                ]
            rows.append(meta)
            manifest["items"] += 1
            if reason is None:
                manifest["good"] += 1
            else:
                _add_reject(manifest, reason, f"{tar_name}/{key}")
        if hostile and shard == 0:
            digits = NUM_SHARD_DIGITS + NUM_SAMPLE_DIGITS
            extra = [f"{shard * 10**NUM_SAMPLE_DIGITS + images_per_shard + j:0{digits}d}" for j in range(7)]
            last_good = max(i for i in range(images_per_shard) if (shard, i) not in plan)
            good_key = f"{shard * 10**NUM_SAMPLE_DIGITS + last_good:0{digits}d}"
            hostile_members, hostile_rows, fate = _hostile_samples(seed, photos, tar_name, good_key, extra)
            members += hostile_members
            rows += hostile_rows
            for key, reason in fate.items():
                manifest["items"] += 1
                if reason is None:
                    manifest["good"] += 1
                else:
                    _add_reject(manifest, reason, key)
        _write_tar(root / tar_name, members)
        pq.write_table(pa.Table.from_pylist(rows, schema=LAION_SCHEMA), root / tar_name.replace(".tar", ".parquet"))
        num_failed = sum(1 for row in rows if row["status"] == "failed_to_download")
        stats = {
            "count": len(rows),
            "successes": len(rows) - num_failed,
            "failed_to_download": num_failed,
            "failed_to_resize": 0,
            "duration": 1.5,
            "start_time": float(MTIME + 10 * shard),
            "end_time": float(MTIME + 10 * shard) + 1.5,
            "status_dict": status_dict,
        }
        (root / tar_name.replace(".tar", "_stats.json")).write_text(json.dumps(stats, indent=4))
        manifest["shards"].append(tar_name)
    return _sorted_reasons(manifest)


# ----------------------------------------------------------------------------- ImageNet


def build_imagenet_world(
    root: Path, num_classes: int = 6, images_per_class: int = 24, seed: int = 0, broken: bool = True
) -> dict:
    """ImageNet train layout in `root`: `<wnid>/<wnid>_<n>.JPEG`, `images_per_class` good images
    per class; with `broken` one zero-byte and one non-image `.JPEG` are added on top."""
    if not 1 <= num_classes <= len(IMAGENET_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(IMAGENET_CLASSES)}], got {num_classes}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    root = _prepare_root(root)
    classes = IMAGENET_CLASSES[:num_classes]
    rng = np.random.default_rng([seed, 1])
    extras: dict[int, list[str]] = {}  # class index -> reasons of the broken files it gets
    if broken:
        extras.setdefault(int(rng.integers(num_classes)), []).append(R.EMPTY_FILE)
        extras.setdefault(int(rng.integers(num_classes)), []).append(R.NOT_AN_IMAGE)
    manifest = _empty_manifest(root)
    manifest["classes"] = {wnid: name for wnid, name, _ in classes}
    for c, (wnid, _, style) in enumerate(classes):
        folder = root / wnid
        folder.mkdir()
        bad = extras.get(c, [])
        # Broken files take random numbers among 1..N so they do not all sort last.
        numbers = rng.permutation(np.arange(1, images_per_class + len(bad) + 1))
        bad_numbers = dict(zip(numbers[: len(bad)].tolist(), bad))
        for n in range(1, images_per_class + len(bad) + 1):
            key = f"{wnid}/{wnid}_{n}.JPEG"
            manifest["items"] += 1
            if n in bad_numbers:
                reason = bad_numbers[n]
                (root / key).write_bytes(b"" if reason == R.EMPTY_FILE else HTML_PAGE)
                _add_reject(manifest, reason, key)
                continue
            item_rng = np.random.default_rng([seed, 1, c, n])
            width, height = _random_size(item_rng, 180, 500, 2.0)
            if isinstance(style, str):
                img = _photo_variant(item_rng, style, width, height)
            else:
                img = _generated_image(item_rng, width, height, style)
            (root / key).write_bytes(_encode_jpeg(img))
            manifest["good"] += 1
    return _sorted_reasons(manifest)


def build_demo_world(root: Path, seed: int = 0, small: bool = False) -> dict:
    """Both worlds: `root/laion` and `root/imagenet`. Keys in the combined manifest are relative
    to `root` (`laion/00000.tar/000000012`); each world's own manifest is under its name."""
    root = _prepare_root(root)
    if small:
        laion = build_laion_world(root / "laion", num_shards=2, images_per_shard=12, seed=seed, hostile=True)
        imagenet = build_imagenet_world(root / "imagenet", num_classes=4, images_per_class=8, seed=seed)
    else:
        laion = build_laion_world(root / "laion", seed=seed, hostile=True)
        imagenet = build_imagenet_world(root / "imagenet", seed=seed)
    manifest = _empty_manifest(root)
    for name, world in (("laion", laion), ("imagenet", imagenet)):
        manifest[name] = world
        manifest["items"] += world["items"]
        manifest["good"] += world["good"]
        for reason, keys in world["keys_by_reason"].items():
            for key in keys:
                _add_reject(manifest, reason, f"{name}/{key}")
    return _sorted_reasons(manifest)
