"""Annotated sets for the sample world: a COCO-format set, a depth/normals/edges set, a paired
folder, a photo folder, and ADE20K / Pascal VOC folders, in the layouts the annotated sources read
(pipelines/coco.py, dense_annotations.py, paired_folders.py, derived_pairs.py, semantic_folders.py). Each builder plants known-bad
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

from uvd.demo.world import _available_photos, _load_photo, _prepare_root
from uvd.pipelines import pairing as P
from uvd.pipelines import render
from uvd.pipelines.coco import UNANNOTATED
from uvd import records as R

WIDTH, HEIGHT = 192, 144
# COCO's own ids (non-contiguous, as in the 80 categories): label values 1, 2, 3 by sorted position.
PERSON, SUITCASE, BALL = 1, 33, 37
CATEGORIES = [{"id": PERSON, "name": "person", "supercategory": "person"}, {"id": SUITCASE, "name": "suitcase", "supercategory": "accessory"},
              {"id": BALL, "name": "sports ball", "supercategory": "sports"}]
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


def _circle(cx: float, cy: float, r: float, n: int = 16) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [round(float(v), 2) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def _quad(kp: np.ndarray, joints: tuple[int, int, int, int], pad: float = 0) -> list[float]:
    pts = [kp[j, :2] + (pad * (1 if k in (1, 2) else -1), 0) for k, j in enumerate(joints)]
    return [round(float(v), 2) for p in pts for v in p]


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _coco_image(rng: np.random.Generator, crowd_format: str) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """A generated scene -> (RGB image, COCO annotations without ids, person keypoints (17, 3)).

    A suitcase (a 1-part polygon), a sports ball (a 16-gon), a person (a 3-part polygon: head,
    torso, legs) and, bottom right, a crowd of people as RLE (`crowd_format`: uncompressed | compressed)."""
    import pycocotools.mask as mask_utils

    ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
    top, bottom = rng.integers(60, 200, 3), rng.integers(20, 120, 3)
    image = Image.fromarray(np.broadcast_to(top * (1 - ramp) + bottom * ramp, (HEIGHT, WIDTH, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    anns = []
    bx, by, bw, bh = int(rng.integers(110, 140)), int(rng.integers(50, 70)), int(rng.integers(30, 45)), int(rng.integers(25, 40))
    polygon = [bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]
    draw.polygon(polygon, fill=tuple(int(c) for c in rng.integers(100, 255, 3)))
    anns.append({"category_id": SUITCASE, "bbox": [bx, by, bw, bh], "segmentation": [polygon], "iscrowd": 0})
    r = int(rng.integers(10, 16))
    cx, cy = int(rng.integers(r + 2, 60)), int(rng.integers(HEIGHT - 40, HEIGHT - r - 2))
    ball = _circle(cx, cy, r)
    draw.polygon(ball, fill=(240, 240, 240), outline=(20, 20, 20))
    anns.append({"category_id": BALL, "bbox": [cx - r, cy - r, 2 * r, 2 * r], "segmentation": [ball], "iscrowd": 0})
    kp = _person(rng, float(rng.integers(70, 100)), float(rng.integers(4, 12)), 1.15)
    color = tuple(int(c) for c in rng.integers(0, 90, 3))
    parts = [_circle(kp[0, 0], kp[0, 1], 7, 8), _quad(kp, (5, 6, 12, 11), 2), _quad(kp, (11, 12, 16, 15), 2)]
    for part in parts:
        draw.polygon(part, fill=color)
    for a, b in PERSON_LIMBS[:4]:  # arms: drawn, but (as often in COCO) not in the mask
        draw.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=color, width=4)
    x0, y0 = kp[:, 0].min() - 7, kp[:, 1].min() - 8
    x1, y1 = kp[:, 0].max() + 7, kp[:, 1].max() + 3
    anns.append({"category_id": PERSON, "bbox": [round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)],
                 "segmentation": parts, "iscrowd": 0})
    crowd = np.zeros((HEIGHT, WIDTH), np.uint8)
    for j in range(5):  # five small figures side by side
        crowd[HEIGHT - 26 + (j % 2) * 3 : HEIGHT - 2, WIDTH - 44 + 8 * j : WIDTH - 39 + 8 * j] = 1
    pixels = np.asarray(image).copy()
    pixels[crowd.astype(bool)] = color
    if crowd_format == "uncompressed":
        rle = {"size": [HEIGHT, WIDTH], "counts": _uncompressed_rle(crowd)}
    else:
        encoded = mask_utils.encode(np.asfortranarray(crowd))
        rle = {"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode()}
    ys, xs = np.nonzero(crowd)
    anns.append({"category_id": PERSON, "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                 "segmentation": rle, "iscrowd": 1, "area": float(crowd.sum())})
    return pixels, anns, kp


def build_coco_world(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """COCO 2017 layout as it ships: `annotations/{instances,person_keypoints}_val.json`, `val/NNNNNN.jpg`;
    polygon masks (several parts for people), crowd RLE (uncompressed counts on even images,
    compressed strings on odd ones), non-contiguous category ids (1, 33, 37), no label maps.

    Broken on purpose: one image with an out-of-range box, an out-of-range keypoint and a crowd RLE
    of the wrong size (its three annotations are rejected, so the image is `unpaired`); an image
    listed but not on disk; one listed with no annotation (`unannotated`); one on disk but not
    listed; an annotation of an unknown image id; and `instances_train.json`, not valid JSON."""
    root = _prepare_root(root)
    for folder in ("annotations", "val"):
        (root / folder).mkdir(parents=True)
    manifest = _manifest(root)
    images, instances, people = [], [], []
    broken, missing, empty = num_images, num_images + 1, num_images + 2
    for i in range(num_images + 3):
        rng = np.random.default_rng([seed, 7, i])
        name = f"{i:06d}.jpg"
        pixels, anns, kp = _coco_image(rng, "uncompressed" if i % 2 == 0 else "compressed")
        images.append({"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
        key = f"val/{name}"
        manifest["items"] += 1
        if i == missing:
            _reject(manifest, P.MISSING_IMAGE, key)
            continue
        (root / key).write_bytes(_jpeg(pixels))
        if i == empty:
            _reject(manifest, UNANNOTATED, key)
            continue
        if i == broken:
            anns[1]["bbox"] = [WIDTH - 10, 20, 30, 30]  # runs 20 px past the right edge
            anns[3]["segmentation"] = {"size": [HEIGHT // 2, WIDTH], "counts": [0, HEIGHT // 2 * WIDTH]}
            kp[9] = (WIDTH + 15, kp[9, 1], 2)  # a visible wrist outside the image
        for ann in anns:
            x, y, w, h = ann["bbox"]
            instances.append({"id": len(instances) + 1, "image_id": i + 1, "area": float(w * h), **ann})
        people.append({"id": len(people) + 1, "image_id": i + 1, "category_id": PERSON, "bbox": anns[2]["bbox"], "iscrowd": 0,
                       "segmentation": anns[2]["segmentation"], "keypoints": [round(v, 1) for v in kp.reshape(-1).tolist()], "num_keypoints": 17})
        people.append({"id": len(people) + 1, "image_id": i + 1, "category_id": PERSON, "bbox": anns[3]["bbox"], "iscrowd": 1,
                       "segmentation": anns[3]["segmentation"], "keypoints": [0] * 51, "num_keypoints": 0})
        manifest["items"] += 3
        if i == broken:
            for task, reason in (("detection", render.BAD_BOX), ("pose", render.BAD_KEYPOINTS), ("segmentation", render.MISMATCHED_ANNOTATION)):
                _reject(manifest, reason, f"{key}#{task}")
            _reject(manifest, P.UNPAIRED, key)
            continue
        manifest["images"] += 4
    (root / "val" / "extra.jpg").write_bytes(_jpeg(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)))
    _reject(manifest, P.MISSING_ANNOTATION, "val/extra.jpg")
    instances.append({"id": len(instances) + 1, "image_id": 999, "category_id": BALL, "bbox": [1, 1, 5, 5], "area": 25.0,
                      "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "iscrowd": 0})
    _reject(manifest, P.MISSING_IMAGE, f"annotations/instances_val.json#{len(instances)}")
    manifest["items"] += 2
    coco = {"info": {"description": "UVD demo"}, "licenses": [], "images": images}
    (root / "annotations/instances_val.json").write_text(json.dumps({**coco, "annotations": instances, "categories": CATEGORIES}))
    person = [c for c in CATEGORIES if c["id"] == PERSON]
    (root / "annotations/person_keypoints_val.json").write_text(json.dumps({**coco, "annotations": people, "categories": person}))
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


def _semantic_scene(rng: np.random.Generator, num_classes: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, class-id map): a background class and three shapes of other classes."""
    labels = Image.new("L", (width, height), int(rng.integers(0, num_classes + 1)))
    draw = ImageDraw.Draw(labels)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
        w, h = int(rng.integers(15, 30)), int(rng.integers(15, 30))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x, y, x + w, y + h], fill=int(rng.integers(1, num_classes + 1)))
    labels = np.asarray(labels)
    colors = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(colors[labels] + noise, 0, 255).astype(np.uint8), labels


def build_ade20k_world(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """ADE20K's layout: `ADEChallengeData2016/images/validation/ADE_val_NNNNNNNN.jpg` and
    `annotations/validation/ADE_val_NNNNNNNN.png` (values 0..150). Broken on purpose: an image without
    label map, a label map of the wrong size, a label map with a class id of 200, a label map of no image."""
    root = _prepare_root(root)
    base = root / "ADEChallengeData2016"
    (base / "images/validation").mkdir(parents=True)
    (base / "annotations/validation").mkdir(parents=True)
    manifest = _manifest(root)
    for i in range(num_images + 3):
        rng = np.random.default_rng([seed, 11, i])
        stem = f"ADE_val_{i + 1:08d}"
        pixels, labels = _semantic_scene(rng, 150, 160, 120)
        (base / f"images/validation/{stem}.jpg").write_bytes(_jpeg(pixels))
        key = f"ADEChallengeData2016/validation/{stem}.jpg"
        extra = i - num_images  # 0: no label map, 1: wrong size, 2: class 200
        if extra == 1:
            labels = labels[:60]
        elif extra == 2:
            labels = labels.copy()
            labels[:5, :5] = 200
        if extra != 0:
            (base / f"annotations/validation/{stem}.png").write_bytes(_png(labels))
        reason = {0: P.MISSING_ANNOTATION, 1: render.MISMATCHED_ANNOTATION, 2: render.BAD_ANNOTATION}.get(extra)
        manifest["items"] += 2
        if reason:
            _reject(manifest, reason, f"{key}#segmentation")
            _reject(manifest, P.UNPAIRED, key)
        else:
            manifest["images"] += 2
    (base / "annotations/validation/ADE_val_00000999.png").write_bytes(_png(np.zeros((120, 160), np.uint8)))
    _reject(manifest, P.MISSING_IMAGE, "ADEChallengeData2016/validation/ADE_val_00000999.png#segmentation")
    manifest["items"] += 1
    manifest["path"] = str(base)
    manifest["pairs"] = {"segmentation": num_images}
    return manifest


def build_voc_world(root: Path, num_images: int = 16, seed: int = 0) -> dict:
    """Pascal VOC's layout: `VOCdevkit/VOC2012/JPEGImages/2007_NNNNNN.jpg`, `SegmentationClass/*.png`
    (palette PNGs, 255 on object boundaries), `ImageSets/Segmentation/{train,val,trainval}.txt`; plus
    detection-only JPEGs in no list. Broken on purpose: a listed name with no JPEG, a listed image
    without label map."""
    from uvd.pipelines.render import PALETTE

    root = _prepare_root(root)
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    manifest = _manifest(root)
    names = {"train": [], "val": []}
    for i in range(num_images + 2):
        rng = np.random.default_rng([seed, 12, i])
        stem = f"2007_{i:06d}"
        split = "train" if i % 2 == 0 else "val"
        names[split].append(stem)
        pixels, labels = _semantic_scene(rng, 20, 150, 110)
        edges = _boundaries(labels)
        labels = np.where(edges, 255, labels).astype(np.uint8)  # VOC's "void" boundaries
        key = f"VOC2012/{split}/{stem}.jpg"
        manifest["items"] += 1
        if i == num_images:  # listed, but no JPEG
            _reject(manifest, P.MISSING_IMAGE, f"VOC2012/{split}/{stem}")
            continue
        (base / f"JPEGImages/{stem}.jpg").write_bytes(_jpeg(pixels))
        manifest["items"] += 1
        if i == num_images + 1:  # listed, no label map
            _reject(manifest, P.MISSING_ANNOTATION, f"{key}#segmentation")
            _reject(manifest, P.UNPAIRED, key)
            continue
        png = Image.fromarray(labels, mode="P")
        png.putpalette(PALETTE.reshape(-1).tolist())
        png.save(base / f"SegmentationClass/{stem}.png")
        manifest["images"] += 2
    for i in range(3):  # detection-only images: not part of the segmentation set
        (base / f"JPEGImages/2008_{i:06d}.jpg").write_bytes(_jpeg(np.full((60, 80, 3), 40 * i, np.uint8)))
    for split, stems in names.items():
        (base / f"ImageSets/Segmentation/{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    (base / "ImageSets/Segmentation/trainval.txt").write_text("".join(f"{s}\n" for s in sorted(names["train"] + names["val"])))
    manifest["path"] = str(root / "VOCdevkit")
    manifest["pairs"] = {"segmentation": num_images}
    manifest["pairs_by_split"] = {"train": num_images // 2, "val": num_images // 2}
    return manifest


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another class (2 px wide boundaries, as in VOC)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= edge[:, :-1].copy()
    return edge


def build_annotated_world(root: Path, seed: int = 0) -> dict:
    """The sets under `root`: coco/, dense/, paired/, photos/, ade20k/, voc/ (each manifest under its name)."""
    root = _prepare_root(root)
    return {
        "coco": build_coco_world(root / "coco", seed=seed),
        "dense": build_dense_world(root / "dense", seed=seed),
        "paired": build_paired_world(root / "paired", seed=seed),
        "photos": build_photo_folder(root / "photos", seed=seed),
        "ade20k": build_ade20k_world(root / "ade20k", seed=seed),
        "voc": build_voc_world(root / "voc", seed=seed),
    }
