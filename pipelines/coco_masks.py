"""COCO instance masks -> one semantic label map per image, decoded with pycocotools.

Masks come as polygons (`iscrowd: 0`: a list of parts, each [x1, y1, x2, y2, ...]) or RLE
(`iscrowd: 1`: `{"size": [h, w], "counts": [...]}` uncompressed, or `counts` a compressed string).
Label values: a category's value is its position in the sorted list of the file's category ids,
plus one (COCO's 80 ids 1..90 -> 1..80), 0 is background; the segmentation renderer turns a value
into the PASCAL VOC palette color of that index. Crowd regions get IGNORE_LABEL (255, black), or
their category's value with `crowd: category`.
"""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

from uvd.pipelines import render
from uvd.records import RejectError

MAX_CATEGORIES = render.IGNORE_LABEL - 1  # values 1..254; 255 is the ignore label


def palette_indices(categories: list[dict]) -> dict[int, int]:
    """Category id -> label value: position in the sorted ids + 1 (0 is background)."""
    return {cid: i + 1 for i, cid in enumerate(sorted({c["id"] for c in categories}))}


def check_category(ann: dict, palette_index: dict[int, int], labels: bool = True) -> int:
    """The annotation's label value; an unknown category (or, for `labels`, one past 254) is refused."""
    value = palette_index.get(ann.get("category_id"))
    if value is None:
        raise RejectError(render.BAD_ANNOTATION, f"annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}")
    if labels and value > MAX_CATEGORIES:
        raise RejectError(render.BAD_ANNOTATION, f"category_id {ann['category_id']}: more than {MAX_CATEGORIES} categories")
    return value


def annotation_mask(segmentation, height: int, width: int, ann_id=None) -> np.ndarray | None:
    """One annotation's `segmentation` -> (H, W) bool mask (None for a polygon with no area).

    Polygon parts with fewer than 3 points have no area and are skipped (COCO has a few)."""
    where = f"annotation {ann_id}"
    if isinstance(segmentation, list):
        parts = []
        for part in segmentation:
            if not isinstance(part, list) or len(part) % 2 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in part):
                raise RejectError(render.BAD_ANNOTATION, f"{where}: polygon part is not a flat list of x, y numbers")
            if len(part) >= 6:
                parts.append([float(v) for v in part])
        if not parts:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if list(size) != [height, width]:
            raise RejectError(render.MISMATCHED_ANNOTATION, f"{where}: RLE size {size}, image is {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths alternating 0s and 1s, column-major
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise RejectError(render.BAD_ANNOTATION, f"{where}: RLE counts do not sum to {height}x{width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):  # compressed (COCO's LEB128-like string)
            runs = counts_from_string(counts)
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                raise RejectError(render.BAD_ANNOTATION, f"{where}: compressed RLE does not decode to {height}x{width} pixels")
            rle = {"size": [height, width], "counts": counts.encode()}
        else:
            raise RejectError(render.BAD_ANNOTATION, f"{where}: RLE counts must be a list or a string")
    else:
        raise RejectError(render.BAD_ANNOTATION, f"{where}: segmentation is neither polygons nor RLE")
    try:
        mask = mask_utils.decode(rle)
    except ValueError as err:
        raise RejectError(render.BAD_ANNOTATION, f"{where}: {err}") from None
    return mask.astype(bool)


def counts_from_string(text: str) -> list[int] | None:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString, which does not
    check its input), or None when the string ends inside a number."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def semantic_labels(anns: list[dict], palette_index: dict[int, int], height: int, width: int, crowd: str = "ignore") -> np.ndarray | None:
    """(H, W) uint8 label map of one image's annotations, or None when none has a mask.

    Painting order: crowd regions first, then instances from the largest mask to the smallest,
    so a small object on a large one stays visible and individually annotated people stand out
    of the crowd around them."""
    labels = np.zeros((height, width), np.uint8)
    masks = []
    for ann in anns:
        if "segmentation" not in ann:
            continue
        value = check_category(ann, palette_index)
        mask = annotation_mask(ann["segmentation"], height, width, ann.get("id"))
        if mask is None:
            continue
        is_crowd = bool(ann.get("iscrowd", 0))
        masks.append((not is_crowd, -int(mask.sum()), render.IGNORE_LABEL if is_crowd and crowd == "ignore" else value, mask))
    if not masks:
        return None
    for _, _, value, mask in sorted(masks, key=lambda m: m[:2]):
        labels[mask] = value
    return labels
