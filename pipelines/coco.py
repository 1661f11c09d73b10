"""`coco`: COCO-format datasets rendered to detection, pose and segmentation images, paired.

    uvd run recipes/coco.yaml --set inputs=/data/coco --out out/coco

Layout per root: `annotations/instances_<split>.json` (boxes), `annotations/person_keypoints_<split>.json`
(17 keypoints per person), images in `<split>/`, optional label maps `labels/<split>/<stem>.png`.
One unit per split. Tasks `detection`, `pose`, `segmentation` (8-pair sentences) and, with
`sentence.tuples`, `multi_annotation`. Broken annotations are rejected with their reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from pipelines import pairing as P
from pipelines import render
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import Source, UnitImages, check_unique_names, resolve_inputs

TASKS = ("detection", "pose", "segmentation")
ANNOTATION_FILES = {"detection": "instances", "pose": "person_keypoints"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class CocoOptions(P.PairingOptions):
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    tuples: bool = True
    pose_background: str = "black"  # black | image: skeletons on black, or drawn over the photo
    pose_min_visibility: int = 1  # COCO v: 0 unlabeled, 1 occluded, 2 visible; lower ones are skipped
    ignore_label: int = 255  # label-map value rendered black

    def validate(self, path: str) -> None:
        super().validate(path)
        P.check_tasks(f"{path}.tasks", self.tasks, TASKS)
        if self.pose_background not in ("black", "image"):
            raise ValueError(f"{path}.pose_background: {self.pose_background!r} is not one of black, image")
        if self.pose_min_visibility not in (1, 2):
            raise ValueError(f"{path}.pose_min_visibility: must be 1 or 2, got {self.pose_min_visibility}")


@register_source
class CocoSource(Source):
    name = "coco"
    Options = CocoOptions
    units_per_part = 1
    input_hint = "COCO roots with annotations/*_<split>.json"

    def list_units(self) -> list[str]:
        units = []
        for root in resolve_inputs(self.recipe.inputs):
            if not (root / "annotations").is_dir():
                raise ValueError(f"inputs: {root} has no annotations/ folder (COCO layout: annotations/instances_<split>.json)")
            splits = set()
            for path in (root / "annotations").glob("*.json"):
                for prefix in ANNOTATION_FILES.values():
                    if path.stem.startswith(prefix + "_"):
                        splits.add(path.stem[len(prefix) + 1 :])
            units.extend(str(root / split) for split in sorted(splits))
        check_unique_names(units, "splits")
        return units

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        items = self._items(Path(unit))
        for count, item in enumerate(items):
            if max_items is not None and count >= max_items:
                return
            yield item

    def _items(self, folder: Path) -> Iterator[Item]:
        root, split = folder.parent, folder.name
        images: dict[int, dict] = {}  # image id -> COCO image entry
        annotations: dict[str, dict[int, list[dict]]] = {}  # task -> image id -> annotations
        categories: dict[str, set] = {}
        for task, prefix in ANNOTATION_FILES.items():
            path = root / "annotations" / f"{prefix}_{split}.json"
            if not path.is_file():
                continue
            try:
                data = _load_coco(path)
            except ValueError as err:
                yield P.reject_item(f"annotations/{path.name}", P.BAD_JSON, str(err))
                continue
            ids = {im["id"] for im in data["images"]}
            images.update((im["id"], im) for im in data["images"])
            categories[task] = {c["id"] for c in data["categories"]}
            per_image = annotations.setdefault(task, {i: [] for i in ids})
            for ann in data["annotations"]:
                if ann.get("image_id") not in ids:
                    detail = f"image_id {ann.get('image_id')!r} is not among the file's images"
                    yield P.reject_item(f"annotations/{path.name}#{ann.get('id')}", P.MISSING_IMAGE, detail)
                else:
                    per_image[ann["image_id"]].append(ann)
        labels_dir = root / "labels" / split
        listed = {im["file_name"] for im in images.values()}
        for entry in sorted(images.values(), key=lambda im: im["file_name"]):
            yield from self._image_items(folder, entry, annotations, categories, labels_dir)
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.name not in listed:
                    yield P.reject_item(f"{split}/{path.name}", P.MISSING_ANNOTATION, "not listed in any annotation file")
        if labels_dir.is_dir() and "segmentation" in self.options.tasks:
            stems = {Path(name).stem for name in listed}
            for path in sorted(labels_dir.glob("*.png")):
                if path.stem not in stems:
                    yield P.reject_item(f"labels/{split}/{path.name}", P.MISSING_IMAGE, "no image of this name in the annotations")

    def _image_items(self, folder, entry, annotations, categories, labels_dir) -> Iterator[Item]:
        key = f"{folder.name}/{entry['file_name']}"
        path = folder / entry["file_name"]
        if not path.is_file():
            yield P.reject_item(key, P.MISSING_IMAGE, f"listed in the annotations, but {path} does not exist")
            return
        data = path.read_bytes()
        yield P.input_item(key, data)
        image = P.decode_rgb(data, self.recipe.image.max_pixels)
        if image is None:
            return  # the shared path rejects the image itself with its reason
        height, width = image.shape[:2]
        for task in self.options.tasks:
            if task != "segmentation" and entry["id"] not in annotations.get(task, {}):
                continue
            anns = annotations.get(task, {}).get(entry["id"], [])
            try:
                if (entry.get("width"), entry.get("height")) not in ((width, height), (None, None)):
                    raise render.AnnotationError(
                        render.MISMATCHED_ANNOTATION, f"annotations say {entry.get('width')}x{entry.get('height')}, image is {width}x{height}"
                    )
                if task == "detection" and anns:
                    for ann in anns:
                        _check_category(ann, categories[task])
                    rendered = render.render_detection(image, [(ann.get("bbox", []), ann["category_id"]) for ann in anns])
                elif task == "pose" and any(ann.get("num_keypoints", 1) > 0 for ann in anns):
                    people = [ann.get("keypoints", []) for ann in anns if ann.get("num_keypoints", 1) > 0]
                    background = image if self.options.pose_background == "image" else None
                    rendered = render.render_pose(people, height, width, background, self.options.pose_min_visibility)
                elif task == "segmentation" and labels_dir.is_dir():
                    labels = P.fit_nearest(_label_map(labels_dir, entry, height, width), self.recipe.image)
                    rendered = render.render_segmentation(labels, self.options.ignore_label)
                else:
                    continue  # this image has no annotation of this type
            except render.AnnotationError as err:
                yield P.reject_item(P.annotation_key(key, task), err.reason, err.detail)
                continue
            yield P.annotation_item(key, task, rendered)

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return P.assemble_annotated(units, self.options.tasks, self.options, self.rng)


def _load_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError("expected an object with lists images, annotations and categories")
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"image entry without id or file_name: {str(im)[:100]}")
    if not all(isinstance(a, dict) for a in data["annotations"]) or not all(isinstance(c, dict) and "id" in c for c in data["categories"]):
        raise ValueError("annotations and categories must be objects (categories with an id)")
    return data


def _check_category(ann: dict, known: set) -> None:
    if ann.get("category_id") not in known:
        raise render.AnnotationError(render.BAD_ANNOTATION, f"annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}")


def _label_map(labels_dir: Path, entry: dict, height: int, width: int) -> np.ndarray:
    path = labels_dir / f"{Path(entry['file_name']).stem}.png"
    if not path.is_file():
        raise render.AnnotationError(P.MISSING_ANNOTATION, f"no label map {path.name} in {labels_dir}")
    try:
        labels = np.asarray(Image.open(path))
    except OSError as err:
        raise render.AnnotationError(render.BAD_ANNOTATION, f"{path.name}: {err}") from None
    if labels.shape != (height, width):
        raise render.AnnotationError(render.MISMATCHED_ANNOTATION, f"label map is {labels.shape}, image is {(height, width)}")
    return labels
