"""Annotation renderers: every annotation becomes an RGB image, (H, W, 3) uint8.

Pure numpy/OpenCV functions, usable on their own; the annotated sources call them inside
`read_unit`. A malformed annotation raises `RejectError(reason, detail)`, which the
source turns into a reject. Palettes and colors are fixed, so the same class, category or
limb has the same color in every dataset.
"""
from __future__ import annotations

import cv2
import numpy as np

from uvd.records import RejectError, reason

# Reject reasons of malformed annotations (see also pipelines/pairing.py).
BAD_ANNOTATION = reason("bad_annotation", "an annotation that cannot be read or rendered (bad shape, values, encoding)")
BAD_BOX = reason("bad_box", "a box that is not [x, y, w, h] or lies outside its image")
BAD_KEYPOINTS = reason("bad_keypoints", "keypoints that are not 17 (x, y, v) triples, or labeled outside the image")
MISMATCHED_ANNOTATION = reason("mismatched_annotation", "an annotation whose size differs from its image's")


def _voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC label colormap (bit-interleaved class id): class 0 black, 1 (128,0,0), ..."""
    palette = np.zeros((n, 3), np.uint8)
    for label in range(n):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


# Segmentation: class id -> RGB, the VOC colormap for ids 0..254; IGNORE_LABEL (255) -> black.
PALETTE = _voc_palette()
IGNORE_LABEL = 255
PALETTE[IGNORE_LABEL] = (0, 0, 0)


# ADE20K (SceneParsing, 150 classes): class c in 1..150 -> the c-th color of its standard palette
# (as MMSegmentation and the ADE20K toolkit draw it), 0 ("other") and 151..255 -> black.
_ADE20K_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = np.zeros((256, 3), np.uint8)
ADE20K_PALETTE[1:151] = np.frombuffer(bytes.fromhex("".join(_ADE20K_HEX)), np.uint8).reshape(150, 3)


def category_color(category_id: int) -> tuple[int, int, int]:
    """Detection box color of a category: hue stepped by the golden ratio, full saturation."""
    hue = int((category_id * 0.618033988749895 % 1.0) * 180)  # OpenCV hue range is 0..179
    hsv = np.array([[[hue, 255, 255]]], np.uint8)
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def render_segmentation(labels: np.ndarray, ignore_label: int | None = IGNORE_LABEL, palette: np.ndarray = PALETTE) -> np.ndarray:
    """(H, W) integer class ids -> (H, W, 3) colors of `palette` (256 x 3); `ignore_label` -> black."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise RejectError(BAD_ANNOTATION, f"label map must be (H, W) integers, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise RejectError(BAD_ANNOTATION, f"class ids must be in 0..255, got {labels.min()}..{labels.max()}")
    out = palette[labels.astype(np.int64)]
    if ignore_label is not None:
        out[labels == ignore_label] = 0
    return out


def check_box(box, width: int, height: int, tolerance: float = 1.0) -> None:
    """COCO [x, y, w, h] must have w, h > 0 and lie inside the image (within `tolerance` px)."""
    if len(box) != 4 or not all(np.isfinite(v) for v in box):
        raise RejectError(BAD_BOX, f"box {box} is not [x, y, w, h]")
    x, y, w, h = box
    if w <= 0 or h <= 0 or x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        raise RejectError(BAD_BOX, f"box {list(box)} outside the {width}x{height} image")


BOX_TINT = 0.35  # share of the category color blended into each box's inside


def render_detection(image: np.ndarray, boxes: list[tuple[list[float], int]], thickness: int | None = None,
                     tint: float = BOX_TINT) -> np.ndarray:
    """Draw each (COCO [x, y, w, h], category id) as a box outline in its category's color, over a
    translucent tint of that color inside the box (`tint` of the color, 1 - `tint` of the image).

    The outline lies inside the box: rows y0..y0+t-1 and y1-t+1..y1, where (x0, y0) is the
    rounded top-left and (x1, y1) the rounded bottom-right pixel (x + w - 1, y + h - 1). The
    default thickness, max(3, longer side / 40), is about 6 px once the image is 256x256: thin
    outlines (2-8 px at 256) keep only 1-12% of their color through an f16 tokenizer, and the
    tint carries the category where the outline does not survive."""
    if not 0 <= tint <= 1:
        raise ValueError(f"tint: must be in [0, 1], got {tint}")
    height, width = image.shape[:2]
    t = thickness or max(3, round(max(height, width) / 40))
    spans = []
    for box, category in boxes:
        check_box(box, width, height)
        x, y, w, h = box
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(width - 1, round(x + w) - 1), min(height - 1, round(y + h) - 1)
        spans.append((x0, y0, x1, y1, category_color(category)))
    out = image.astype(np.float32) if tint else image.copy()
    for x0, y0, x1, y1, color in spans if tint else ():  # every tint first, then every outline on top
        region = out[y0 : y1 + 1, x0 : x1 + 1]
        region *= 1 - tint
        region += tint * np.asarray(color, np.float32)
    if tint:
        out = np.rint(out).astype(np.uint8)
    for x0, y0, x1, y1, color in spans:
        out[y0 : y0 + t, x0 : x1 + 1] = color
        out[max(y0, y1 - t + 1) : y1 + 1, x0 : x1 + 1] = color
        out[y0 : y1 + 1, x0 : x0 + t] = color
        out[y0 : y1 + 1, max(x0, x1 - t + 1) : x1 + 1] = color
    return out


# OpenPose body-18 keypoints, from COCO-17: nose, neck (shoulder midpoint), then right/left arms,
# legs, eyes, ears. COCO_TO_OPENPOSE[i] is the COCO index of OpenPose joint i (-1: the neck).
COCO_TO_OPENPOSE = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose's limbs (pairs of OpenPose-18 joints) and its 18 colors, RGB, as OpenPose and
# ControlNet's annotator draw them; limb i has color i, joint j has color j.
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)


def check_keypoints(keypoints, width: int, height: int, tolerance: float = 1.0) -> np.ndarray:
    """COCO flat [x1, y1, v1, ... x17, y17, v17] -> (17, 3) floats; labeled joints must be in the image."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size != 51 or not np.all(np.isfinite(kp)):
        raise RejectError(BAD_KEYPOINTS, f"expected 17 (x, y, v) triples, got {kp.size} numbers")
    kp = kp.reshape(17, 3)
    if not np.all(np.isin(kp[:, 2], (0, 1, 2))):
        raise RejectError(BAD_KEYPOINTS, f"visibility must be 0, 1 or 2, got {sorted(set(kp[:, 2]))}")
    labeled = kp[:, 2] > 0
    outside = labeled & ((kp[:, 0] < -tolerance) | (kp[:, 1] < -tolerance) | (kp[:, 0] > width + tolerance) | (kp[:, 1] > height + tolerance))
    if outside.any():
        joints = ", ".join(f"{j} at ({kp[j, 0]:g}, {kp[j, 1]:g})" for j in np.flatnonzero(outside))
        raise RejectError(BAD_KEYPOINTS, f"labeled keypoint(s) {joints} outside the {width}x{height} image")
    return kp


def openpose_joints(kp: np.ndarray, min_visibility: int = 1) -> list[tuple[float, float] | None]:
    """(17, 3) COCO keypoints -> 18 OpenPose joints, None where not drawn."""
    shown = [(x, y) if v >= min_visibility else None for x, y, v in kp]
    joints = []
    for coco in COCO_TO_OPENPOSE:
        if coco >= 0:
            joints.append(shown[coco])
        elif shown[5] and shown[6]:  # neck: midpoint of the shoulders, when both are shown
            joints.append(((shown[5][0] + shown[6][0]) / 2, (shown[5][1] + shown[6][1]) / 2))
        else:
            joints.append(None)
    return joints


def render_pose(
    people: list, height: int, width: int, background: np.ndarray | None = None,
    min_visibility: int = 1, thickness: int | None = None,
) -> np.ndarray:
    """OpenPose-style skeletons of COCO keypoint lists, on black or over `background`.

    Limbs are lines in OpenPose's limb colors, joints dots in its joint colors; joints with
    visibility below `min_visibility` (COCO: 0 unlabeled, 1 occluded, 2 visible) are skipped,
    and so is every limb that touches one."""
    out = np.zeros((height, width, 3), np.uint8) if background is None else background.copy()
    t = thickness or max(2, round(max(height, width) / 100))
    for keypoints in people:
        joints = openpose_joints(check_keypoints(keypoints, width, height), min_visibility)
        for i, (a, b) in enumerate(OPENPOSE_LIMBS):
            if joints[a] and joints[b]:
                pa, pb = (round(joints[a][0]), round(joints[a][1])), (round(joints[b][0]), round(joints[b][1]))
                cv2.line(out, pa, pb, OPENPOSE_COLORS[i], t, lineType=cv2.LINE_8)
        for j, joint in enumerate(joints):
            if joint:
                cv2.circle(out, (round(joint[0]), round(joint[1])), t + 1, OPENPOSE_COLORS[j], -1, lineType=cv2.LINE_8)
    return out


def render_depth(depth: np.ndarray, mode: str = "colormap") -> np.ndarray:
    """Depth (H, W) uint16 or float -> near bright, far dark; 0, NaN and inf (no depth) -> black.

    Normalized per image over the valid pixels; `colormap` uses OpenCV's INFERNO map."""
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise RejectError(BAD_ANNOTATION, f"depth must be (H, W), got {depth.shape}")
    d = depth.astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    if not valid.any():
        raise RejectError(BAD_ANNOTATION, "depth map has no valid (finite, > 0) pixel")
    lo, hi = d[valid].min(), d[valid].max()
    near = np.zeros_like(d)
    near[valid] = 1.0 if hi == lo else (hi - d[valid]) / (hi - lo)
    return _draw_near(near, valid, mode)


def _draw_near(near: np.ndarray, valid: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) nearness in [0, 1] -> RGB: INFERNO colormap (or gray), near bright; invalid pixels black."""
    gray = np.round(near * 254).astype(np.uint8) + valid.astype(np.uint8)  # valid pixels: 1..255
    if mode == "grayscale":
        out = np.repeat(gray[..., None], 3, axis=2)
    else:
        out = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    out[~valid] = 0
    return out


def render_disparity(disparity: np.ndarray, mode: str = "colormap") -> np.ndarray:
    """Disparity / inverse depth (H, W) float, as relative depth models predict it (large = near)
    -> the same look as `render_depth`: normalized per image over the finite pixels, near bright;
    NaN and inf -> black. A constant map is drawn mid-gray (no depth order to show)."""
    d = np.asarray(disparity, dtype=np.float64)
    if d.ndim != 2:
        raise RejectError(BAD_ANNOTATION, f"disparity must be (H, W), got {d.shape}")
    valid = np.isfinite(d)
    near = np.zeros_like(d)
    if valid.any():
        lo, hi = d[valid].min(), d[valid].max()
        near[valid] = 0.5 if hi == lo else (d[valid] - lo) / (hi - lo)
    return _draw_near(near, valid, mode)


def render_normals(normals: np.ndarray) -> np.ndarray:
    """Surface normals -> RGB: uint8 RGB images pass through; float unit vectors map
    [-1, 1] -> [0, 255] per axis; zero vectors (no surface) -> black."""
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise RejectError(BAD_ANNOTATION, f"normals must be (H, W, 3), got {normals.shape}")
    if normals.dtype == np.uint8:
        return normals.copy()
    n = normals.astype(np.float64)
    length = np.linalg.norm(n, axis=2)
    surface = length > 0
    if not np.all(np.isfinite(n)) or np.any(np.abs(length[surface] - 1) > 0.05):
        raise RejectError(BAD_ANNOTATION, "normals must be unit vectors (or zero where there is no surface)")
    out = np.round((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
    out[~surface] = 0
    return out


def render_edges(edges: np.ndarray) -> np.ndarray:
    """Edge map (H, W) (binary or soft; uint8 0..255, bool, or float 0..1) -> gray RGB."""
    if edges.ndim == 3:
        edges = edges[..., 0]
    if edges.dtype == np.uint8:
        gray = edges
    elif edges.dtype == bool:
        gray = edges.astype(np.uint8) * 255
    else:
        gray = np.round(np.clip(edges.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Edges computed from an RGB image with OpenCV's Canny -> white edges on black."""
    return render_edges(cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), low, high))


def grayscale(image: np.ndarray) -> np.ndarray:
    """Colorization input: the image's luma (ITU-R 601) in all three channels."""
    return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def black_boxes(image: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Inpainting input: the image with each (x, y, w, h) box set to black."""
    out = image.copy()
    for x, y, w, h in boxes:
        out[y : y + h, x : x + w] = 0
    return out


def random_boxes(rng, width: int, height: int, count: int, min_frac: float, max_frac: float) -> list[tuple[int, int, int, int]]:
    """`count` boxes with sides a random fraction in [min_frac, max_frac] of the image's sides."""
    boxes = []
    for _ in range(count):
        w = max(1, round(width * rng.uniform(min_frac, max_frac)))
        h = max(1, round(height * rng.uniform(min_frac, max_frac)))
        boxes.append((rng.randint(0, width - w), rng.randint(0, height - h), w, h))
    return boxes
