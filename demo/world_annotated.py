"""Annotated sets for the sample world: a COCO-format set, a depth/normals/edges set, a paired
folder and a photo folder, in the layouts the annotated sources read (pipelines/coco.py,
dense_annotations.py, paired_folders.py, derived_pairs.py). Each builder plants known-bad
annotations and returns a manifest: `items` (rows the reader yields), `pairs` per task, `images`
(tokenized images that end up in sentences) and the rejected keys by reason.
`build_annotated_world(root)` builds all four.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.world import _available_photos, _load_photo, _prepare_root
from pipelines import pairing as P
from pipelines import render
from uvd import records as R

WIDTH, HEIGHT = 192, 144
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "ball"}, {"id": 3, "name": "box"}]
COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "retina", "colorwheel")
# COCO-17 limbs used to draw the generated people (mmpose's COCO skeleton, body part).
PERSON_LIMBS = ((5, 7), (7, 9), (6, 8), (8, 10), (5, 6), (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14), (14, 16), (0, 5), (0, 6))


def _manifest(path: Path) -> dict:
    return {"path": str(path), "items": 0, "images": 0, "pairs": {}, "expected_rejects": {}, "keys_by_reason": {}}


def _reject(manifest: dict, reason: str, key: str) -> None:
    manifest["expected_rejects"][reason] = manifest["expected_rejects"].get(reason, 0) + 1
    manifest["keys_by_reason"].setdefault(reason, []).append(key)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _person(rng: np.random.Generator, cx: float, top: float, scale: float) -> np.ndarray:
    """(17, 3) COCO keypoints of a standing person, all visible (v=2) but the ears (v=1)."""
    s = scale
    pts = [(0, 0), (-3, -2), (3, -2), (-6, 0), (6, 0), (-12, 14), (12, 14), (-16, 32), (16, 32), (-18, 48), (18, 48),
           (-8, 50), (8, 50), (-9, 72), (9, 72), (-10, 94), (10, 94)]
    kp = np.array([(cx + x * s + rng.normal(0, 1), top + 6 * s + y * s, 2) for x, y in pts], dtype=np.float64)
    kp[3:5, 2] = 1
    return kp


def _coco_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """A generated scene -> (RGB image, label map, [(bbox, category)], person keypoints (17, 3))."""
    ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
    top, bottom = rng.integers(60, 200, 3), rng.integers(20, 120, 3)
    image = Image.fromarray(np.broadcast_to(top * (1 - ramp) + bottom * ramp, (HEIGHT, WIDTH, 3)).astype(np.uint8))
    labels = Image.new("L", (WIDTH, HEIGHT), 0)
    draw, ldraw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    objects = []
    # a box (category 3) and a ball (2), then the person (1) in front of them
    bx, by, bw, bh = int(rng.integers(110, 140)), int(rng.integers(70, 90)), int(rng.integers(30, 45)), int(rng.integers(25, 40))
    draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], fill=tuple(int(c) for c in rng.integers(100, 255, 3)))
    ldraw.rectangle([bx, by, bx + bw - 1, by + bh - 1], fill=3)
    objects.append(([bx, by, bw, bh], 3))
    r = int(rng.integers(10, 16))
    cx, cy = int(rng.integers(r + 2, 60)), int(rng.integers(HEIGHT - 40, HEIGHT - r - 2))
    ldraw.ellipse([cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1], fill=255)  # unsure boundary: ignore label
    ldraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=2)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 240), outline=(20, 20, 20))
    objects.append(([cx - r, cy - r, 2 * r + 1, 2 * r + 1], 2))
    kp = _person(rng, float(rng.integers(70, 100)), float(rng.integers(4, 12)), 1.15)
    color = tuple(int(c) for c in rng.integers(0, 90, 3))
    for a, b in PERSON_LIMBS:
        for d, value in ((draw, color), (ldraw, 1)):
            d.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=value, width=5)
    for d, value in ((draw, color), (ldraw, 1)):
        d.ellipse([kp[0, 0] - 7, kp[0, 1] - 7, kp[0, 0] + 7, kp[0, 1] + 7], fill=value)
    x0, y0 = kp[:, 0].min() - 7, kp[:, 1].min() - 8
    x1, y1 = kp[:, 0].max() + 7, kp[:, 1].max() + 3
    objects.append(([round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)], 1))
    return np.asarray(image), np.asarray(labels), objects, kp


def build_coco_world(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """COCO layout: `annotations/{instances,person_keypoints}_val.json`, `val/NNNNNN.jpg`, `labels/val/NNNNNN.png`.

    Broken on purpose: one image with an out-of-range box, an out-of-range keypoint and no label
    map (its three annotations are rejected, so the image is `unpaired`); an image listed but not
    on disk; an annotation of an unknown image id; and `instances_train.json`, not valid JSON."""
    root = _prepare_root(root)
    for folder in ("annotations", "val", "labels/val"):
        (root / folder).mkdir(parents=True)
    manifest = _manifest(root)
    images, instances, people = [], [], []
    broken, missing = num_images, num_images + 1
    for i in range(num_images + 2):
        rng = np.random.default_rng([seed, 7, i])
        name = f"{i:06d}.jpg"
        pixels, labels, objects, kp = _coco_image(rng)
        images.append({"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
        if i == broken:
            objects[1] = ([WIDTH - 10, 20, 30, 30], 2)  # runs 20 px past the right edge
            kp[9] = (WIDTH + 15, kp[9, 1], 2)  # a visible wrist outside the image
        for bbox, category in objects:
            instances.append({"id": len(instances) + 1, "image_id": i + 1, "category_id": category, "bbox": bbox,
                              "area": float(bbox[2] * bbox[3]), "iscrowd": 0})
        people.append({"id": len(people) + 1, "image_id": i + 1, "category_id": 1, "bbox": objects[-1][0],
                       "keypoints": [round(v, 1) for v in kp.reshape(-1).tolist()], "num_keypoints": 17, "iscrowd": 0})
        key = f"val/{name}"
        if i == missing:
            _reject(manifest, P.MISSING_IMAGE, key)
            manifest["items"] += 1
            continue
        (root / key).write_bytes(_jpeg(pixels))
        manifest["items"] += 4
        if i == broken:
            for task, reason in (("detection", render.BAD_BOX), ("pose", render.BAD_KEYPOINTS), ("segmentation", P.MISSING_ANNOTATION)):
                _reject(manifest, reason, f"{key}#{task}")
            _reject(manifest, P.UNPAIRED, key)
            continue
        (root / "labels/val" / f"{i:06d}.png").write_bytes(_png(labels))
        manifest["images"] += 4
    instances.append({"id": len(instances) + 1, "image_id": 999, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 0})
    _reject(manifest, P.MISSING_IMAGE, f"annotations/instances_val.json#{len(instances)}")
    manifest["items"] += 1
    coco = {"info": {"description": "UVD demo"}, "images": images, "categories": CATEGORIES}
    (root / "annotations/instances_val.json").write_text(json.dumps({**coco, "annotations": instances}))
    (root / "annotations/person_keypoints_val.json").write_text(json.dumps({**coco, "annotations": people}))
    (root / "annotations/instances_train.json").write_text('{"images": [{"id": 1, "file_name": "0.jpg"}], "annotations": [')
    _reject(manifest, P.BAD_JSON, "annotations/instances_train.json")
    manifest["items"] += 1
    manifest["pairs"] = {"detection": num_images, "pose": num_images, "segmentation": num_images}
    manifest["tuples"] = num_images
    return manifest


def _dense_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sphere over a receding floor -> (RGB, depth in meters (H, W), unit normals (H, W, 3))."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    depth = 2.0 + 6.0 * (1 - ys / height)  # the floor: far at the top
    normals = np.zeros((height, width, 3))
    normals[..., 1] = -1.0
    cx, cy, r = rng.uniform(0.35, 0.65) * width, rng.uniform(0.4, 0.6) * height, rng.uniform(0.2, 0.3) * height
    dx, dy = (xs - cx) / r, (ys - cy) / r
    inside = dx**2 + dy**2 < 1
    dz = np.sqrt(np.clip(1 - dx**2 - dy**2, 0, 1))
    depth[inside] = 1.5 - 0.5 * dz[inside]
    normals[inside] = np.stack([dx, dy, -dz], axis=-1)[inside]
    light = np.array([-0.4, -0.6, -0.7]) / np.linalg.norm([-0.4, -0.6, -0.7])
    shade = np.clip(normals @ light, 0.15, 1)[..., None]
    base = np.where(inside[..., None], rng.integers(120, 255, 3), rng.integers(60, 160, 3))
    return (base * shade).astype(np.uint8), depth, normals


def build_dense_world(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """`images/NNNNNN.png` with `depth/` (16-bit PNG in mm, or .npy meters), `normals/` (.npy unit
    vectors, or RGB PNG) and `edges/` (PNG). Broken on purpose: one image whose depth file is
    missing, normals have the wrong size and edges file is not an image; one orphan depth file."""
    import cv2

    root = _prepare_root(root)
    for folder in ("images", "depth", "normals", "edges"):
        (root / folder).mkdir()
    manifest = _manifest(root)
    for i in range(num_images + 1):
        rng = np.random.default_rng([seed, 8, i])
        stem = f"{i:06d}"
        pixels, depth, normals = _dense_scene(rng, 160, 120)
        (root / "images" / f"{stem}.png").write_bytes(_png(pixels))
        manifest["items"] += 4
        key = f"{root.name}/images/{stem}.png"
        if i == num_images:
            np.save(root / "normals" / f"{stem}.npy", normals[:60].astype(np.float32))
            (root / "edges" / f"{stem}.png").write_bytes(b"<html>not an edge map</html>")
            for task, reason in (("depth", P.MISSING_ANNOTATION), ("normals", render.MISMATCHED_ANNOTATION), ("edges", render.BAD_ANNOTATION)):
                _reject(manifest, reason, f"{key}#{task}")
            _reject(manifest, P.UNPAIRED, key)
            continue
        if i % 2:
            np.save(root / "depth" / f"{stem}.npy", depth.astype(np.float32))
            (root / "normals" / f"{stem}.png").write_bytes(_png(np.round((normals + 1) * 127.5).astype(np.uint8)))
        else:
            (root / "depth" / f"{stem}.png").write_bytes(_png((depth * 1000).astype(np.uint16)))
            np.save(root / "normals" / f"{stem}.npy", normals.astype(np.float32))
        (root / "edges" / f"{stem}.png").write_bytes(_png(cv2.Canny(pixels, 80, 160)))
        manifest["images"] += 4
    (root / "depth" / "000099.png").write_bytes(_png(np.full((120, 160), 3000, np.uint16)))
    _reject(manifest, P.MISSING_IMAGE, f"{root.name}/depth/000099.png")
    manifest["items"] += 1
    manifest["pairs"] = {"depth": num_images, "normals": num_images, "edges": num_images}
    return manifest


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    names = [n for n in COLOR_PHOTOS if n in _available_photos()] or list(_available_photos())
    photo = _load_photo(names[int(rng.integers(len(names)))])
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return np.asarray(Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR))


def build_paired_world(root: Path, num_pairs: int = 16, seed: int = 0) -> dict:
    """A denoising pair folder: `input/NNNNNN.png` (noisy) and `target/NNNNNN.png` (clean photo crops).
    Broken on purpose: an input without target, a target without input, and a target that is an
    HTML page (`not_an_image`, which leaves its input `unpaired`)."""
    root = _prepare_root(root)
    (root / "input").mkdir()
    (root / "target").mkdir()
    manifest = _manifest(root)
    for i in range(num_pairs + 3):
        rng = np.random.default_rng([seed, 9, i])
        clean = _photo_crop(rng, 128)
        noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
        name = f"{i:06d}.png"
        extra = i - num_pairs  # 0: no target, 1: no input, 2: target not an image
        if extra != 1:
            (root / "input" / name).write_bytes(_png(noisy))
        if extra != 0:
            (root / "target" / name).write_bytes(b"<html>404</html>" if extra == 2 else _png(clean))
        if extra == 0:
            _reject(manifest, P.MISSING_ANNOTATION, f"{root.name}/input/{name}")
        elif extra == 1:
            _reject(manifest, P.MISSING_IMAGE, f"{root.name}/target/{name}")
        elif extra == 2:
            _reject(manifest, R.NOT_AN_IMAGE, f"{root.name}/target/{name}")
            _reject(manifest, P.UNPAIRED, f"{root.name}/input/{name}")
        manifest["items"] += 2 if extra < 0 or extra == 2 else 1
        manifest["images"] += 2 if extra < 0 else 0
    manifest["pairs"] = {"denoising": num_pairs}
    return manifest


def build_photo_folder(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """Sample photos (`NNNNNN.jpg`) for colorization and inpainting, plus one HTML page saved as .jpg."""
    root = _prepare_root(root)
    manifest = _manifest(root)
    for i in range(num_images):
        rng = np.random.default_rng([seed, 10, i])
        (root / f"{i:06d}.jpg").write_bytes(_jpeg(_photo_crop(rng, int(rng.integers(128, 200)))))
    (root / f"{num_images:06d}.jpg").write_bytes(b"<html>404</html>")
    _reject(manifest, R.NOT_AN_IMAGE, f"{root.name}/{num_images:06d}.jpg")
    manifest["items"] = 3 * num_images + 1
    manifest["images"] = 3 * num_images
    manifest["pairs"] = {"colorization": num_images, "inpainting": num_images}
    return manifest


def build_annotated_world(root: Path, seed: int = 0) -> dict:
    """All four sets under `root`: coco/, dense/, paired/, photos/ (each manifest under its name)."""
    root = _prepare_root(root)
    return {
        "coco": build_coco_world(root / "coco", seed=seed),
        "dense": build_dense_world(root / "dense", seed=seed),
        "paired": build_paired_world(root / "paired", seed=seed),
        "photos": build_photo_folder(root / "photos", seed=seed),
    }
