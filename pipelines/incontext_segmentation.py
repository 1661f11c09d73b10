"""`incontext_segmentation`: class-aware in-context segmentation sentences from COCO instances.

    uvd run recipes/incontext_segmentation.yaml --set inputs=/data/coco \
        --set sentence.text_tokenizer=/models/gpt2/tokenizer.json --out out/incontext_segmentation

A sentence is k (image, class text, mask) examples and a query, one class across the sentence:
`{x1, t1, m1, ..., xq, tq, mq}`. The mask is the union of the class's instance masks in the image
(white on black, rasterized by pipelines/coco_masks.py); the text names the class and, with
`box_text`, its instances' boxes in 0..999 coordinates of the image ("dog at [12, 40, 310, 500]"),
as the in-context paper found best. Layout of the inputs and units as the `coco` source
(`annotations/instances_<split>.json`, images in `<split>/`). Per unit, each class's (image, mask)
pairs are shuffled with the unit's RNG and cut into groups of k + 1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from uvd.pipelines import coco_masks
from uvd.pipelines import pairing as P
from uvd.pipelines import text as T
from uvd.pipelines.coco import UNANNOTATED, read_coco_json, split_unit_items, split_units
from uvd import records as R
from uvd.records import Item, Reject, RejectError, Sentence, reason
from uvd.registry import register_source
from uvd.source import Source, UnitImages, limit_items

TASK = "incontext_segmentation"
MASK = "mask"  # the role of a class-mask item
SMALL_REGION = reason("small_region", "a class region below sentence.min_area (not rendered, not tokenized)")


@dataclass
class IncontextSegmentationOptions(T.TextOptions):
    images_per_unit: int = 1000  # image files per unit; each class's pairs are grouped within a unit
    min_area: float = 0.01  # a class region below this fraction of the image is left out (small_region)
    box_text: bool = True  # the class text lists its instances' boxes

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.images_per_unit < 1:
            raise ValueError(f"{path}.images_per_unit: must be >= 1, got {self.images_per_unit}")
        if not 0 <= self.min_area < 1:
            raise ValueError(f"{path}.min_area: a fraction in [0, 1), got {self.min_area}")
        if 2 * (self.examples + 1) > P.MAX_IMAGES:
            raise ValueError(f"{path}.examples: {self.examples} examples + the query are {2 * (self.examples + 1)} "
                             f"images; at most {P.MAX_IMAGES} (examples <= {P.MAX_IMAGES // 2 - 1})")


@register_source
class IncontextSegmentationSource(Source):
    name = "incontext_segmentation"
    Options = IncontextSegmentationOptions
    input_hint = "COCO roots with annotations/instances_<split>.json"

    @classmethod
    def check_recipe(cls, recipe) -> None:
        T.check_text_tokenizer(recipe.sentence)
        if recipe.sentence.box_text and recipe.image.resize != "resize":
            raise ValueError("image.resize: box_text gives boxes in whole-image coordinates; use resize (not a crop)")

    def list_units(self) -> list[str]:
        T.require_text_tokenizer(self.options)
        return split_units(self.recipe.inputs, "instances", self.options.images_per_unit)

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        items = split_unit_items(unit, self.options.images_per_unit, "instances", _load_instances,
                                 self._image_items, "annotation file")
        return limit_items(items, max_items)

    def _image_items(self, folder: Path, key: str, entry: dict, coco: _Instances) -> Iterator[Item]:
        data = (folder / entry["file_name"]).read_bytes()
        image = P.decode_rgb(data, self.recipe.image.max_pixels)
        if image is None:
            yield P.input_item(key, data)  # the shared path rejects it with the precise reason
            return
        height, width = image.shape[:2]
        by_class: dict[int, list[dict]] = {}
        for ann in coco.annotations.get(entry["id"], []):
            if "segmentation" in ann:
                by_class.setdefault(ann.get("category_id"), []).append(ann)
        out = []
        for cid in sorted(by_class, key=str):
            mask_key = P.annotation_key(key, f"{MASK}/{cid}")
            try:
                coco_masks.check_category(by_class[cid][0], coco.palette_index, labels=False)
                mask = np.zeros((height, width), bool)
                for ann in by_class[cid]:
                    part = coco_masks.annotation_mask(ann["segmentation"], height, width, ann.get("id"))
                    if part is not None:
                        mask |= part
            except RejectError as err:
                out.append(P.reject_item(mask_key, err.reason, err.detail))
                continue
            if mask.mean() < max(self.options.min_area, 1e-9):
                out.append(P.reject_item(mask_key, SMALL_REGION, f"class {coco.names.get(cid, cid)} covers {mask.mean():.4f} "
                                         f"of the image (sentence.min_area: {self.options.min_area})"))
                continue
            pixels = np.repeat(P.fit_nearest(mask.astype(np.uint8) * 255, self.recipe.image)[..., None], 3, axis=2)
            boxes = [_box(a.get("bbox"), width, height) for a in by_class[cid]]
            meta = {"pair": key, "role": MASK, "category_id": cid, "category": coco.names.get(cid, str(cid)),
                    "boxes": [b for b in boxes if b is not None]}
            out.append(Item(mask_key, array=np.ascontiguousarray(pixels, np.uint8), meta=meta))
        if not any(not item.reject for item in out):
            out.append(P.reject_item(key, UNANNOTATED, f"image id {entry['id']} has no class region to segment"))
        else:
            out.insert(0, P.input_item(key, data))
        yield from out

    def class_text(self, meta: dict) -> str:
        if not self.options.box_text or not meta["boxes"]:
            return meta["category"]
        return f"{meta['category']} at " + ", ".join(f"[{', '.join(map(str, b))}]" for b in meta["boxes"])

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        tokenizer = T.require_text_tokenizer(self.options)
        group = self.options.examples + 1
        for unit in units:
            inputs = {im.key: im for im in unit.images if im.meta.get("role") == P.INPUT}
            pools: dict[str, list] = {}  # category id (as text) -> [(image, mask, text ids, cut)]
            for im in unit.images:
                if im.meta.get("role") != MASK:
                    continue
                if im.meta["pair"] not in inputs:
                    yield Reject(im.key, P.UNPAIRED, f"its image {im.meta['pair']} was rejected", unit.unit)
                    continue
                ids, cut = T.cut_text(tokenizer.encode(self.class_text(im.meta)), self.options.max_text_tokens)
                if len(ids) == 0:
                    yield Reject(im.key, T.EMPTY_TEXT, f"no text ids for class {im.meta['category']!r}", unit.unit)
                    continue
                pools.setdefault(str(im.meta["category_id"]), []).append((inputs[im.meta["pair"]], im, ids, cut))
            used: set[str] = set()
            for cid in sorted(pools):
                pool = pools[cid]
                self.rng.shuffle(pool)
                num_full = len(pool) // group * group
                for start in range(0, num_full, group):
                    chosen = pool[start : start + group]
                    images, segments = [], []
                    for image, mask, ids, _ in chosen:
                        segments += [("image", len(images)), ("text", ids), ("image", len(images) + 1)]
                        images += [image, mask]
                        used.add(image.key)
                    meta = {"examples": self.options.examples, "category_id": chosen[0][1].meta["category_id"],
                            "category": chosen[0][1].meta["category"], "text_tokenizer": tokenizer.identity(),
                            "texts_cut": sum(c for *_, c in chosen)}
                    yield T.TextSentence(TASK, images, meta=meta, segments=segments)
                reason = R.UNUSED_REMAINDER if num_full else T.NO_PARTNER
                for _, mask, _, _ in pool[num_full:]:
                    yield Reject(mask.key, reason, f"{len(pool)} pairs of class {mask.meta['category']} in the unit; "
                                 f"sentences take {group}", unit.unit)
            for key, image in inputs.items():
                if key not in used:
                    yield Reject(key, R.UNUSED_REMAINDER, "none of its class masks made it into a sentence", unit.unit)


def _box(bbox, width: int, height: int) -> list[int] | None:
    """COCO [x, y, w, h] pixels -> [x0, y0, x1, y1] in 0..999 of the image; None when malformed."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return None
    x, y, w, h = bbox
    corners = [x / width, y / height, (x + w) / width, (y + h) / height]
    return [int(min(max(c, 0.0), 1.0) * 999) for c in corners]


@dataclass
class _Instances:
    by_name: dict[str, dict]  # file name -> image entry
    annotations: dict  # image id -> its annotations
    palette_index: dict[int, int]  # category id -> label value (coco_masks.palette_indices)
    names: dict  # category id -> name
    orphans: list  # (annotation id, image id) of annotations whose image is not in the file


@functools.lru_cache(maxsize=2)
def _load_instances(path: str, mtime_ns: int) -> _Instances:
    """Parse and index one instances file (cached per process: a worker reading several units of a
    split parses it once). The `coco` source's loader checks the same shape; it keeps no names."""
    data, annotations, orphans = read_coco_json(path)
    names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    return _Instances({im["file_name"]: im for im in data["images"]}, annotations,
                      coco_masks.palette_indices(data["categories"]), names, orphans)
