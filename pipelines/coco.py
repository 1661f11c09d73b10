"""`coco`: COCO-format datasets as COCO ships them, rendered to detection, pose and segmentation images, paired.

    uvd run recipes/coco.yaml --set inputs=/data/coco --out out/coco

Layout per root: `annotations/instances_<split>.json` (boxes, and instance masks as polygons or
crowd RLE), `annotations/person_keypoints_<split>.json` (17 keypoints per person), images in
`<split>/`. Segmentation is rasterized from the instance masks (pipelines/coco_masks.py); label-map
PNGs `labels/<split>/<stem>.png` are read only with `sentence.segmentation_from: label_maps`.
Units: the split's image files in name order, `sentence.images_per_unit` per unit (`<root>/<split>#<start>`).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from uvd.pipelines import coco_masks
from uvd.pipelines import pairing as P
from uvd.pipelines import render
from uvd.records import Item, Reject, RejectError, Sentence, reason
from uvd.registry import register_source
from uvd.source import IMAGE_SUFFIXES, Source, UnitImages, check_unique_names, limit_items, resolve_inputs

log = logging.getLogger(__name__)

TASKS = ("detection", "pose", "segmentation")
ANNOTATION_FILES = {"detection": "instances", "segmentation": "instances", "pose": "person_keypoints"}
UNANNOTATED = reason("unannotated", "an image the annotation files list, with no annotation of any requested task")


@dataclass
class CocoOptions(P.PairingOptions):
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    tuples: bool = True
    images_per_unit: int = 1000  # image files per unit; pairs are shuffled within a unit
    segmentation_from: str = "instances"  # instances: masks in instances_<split>.json | label_maps: labels/<split>/*.png
    crowd: str = "ignore"  # crowd (iscrowd: 1) regions: ignore (label 255, black) | category (their category's color)
    pose_background: str = "black"  # black | image: skeletons on black, or drawn over the photo
    pose_min_visibility: int = 1  # COCO v: 0 unlabeled, 1 occluded, 2 visible; lower ones are skipped
    ignore_label: int = 255  # label_maps: the value rendered black

    def validate(self, path: str) -> None:
        super().validate(path)
        P.check_tasks(f"{path}.tasks", self.tasks, TASKS)
        if self.images_per_unit < 1:
            raise ValueError(f"{path}.images_per_unit: must be >= 1, got {self.images_per_unit}")
        for name, allowed in (("segmentation_from", ("instances", "label_maps")), ("crowd", ("ignore", "category")),
                              ("pose_background", ("black", "image"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{path}.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.pose_min_visibility not in (1, 2):
            raise ValueError(f"{path}.pose_min_visibility: must be 1 or 2, got {self.pose_min_visibility}")


@register_source
class CocoSource(P.PairsLabels, Source):
    name = "coco"
    Options = CocoOptions
    units_per_part = 1
    input_hint = "COCO roots with annotations/*_<split>.json"

    def list_units(self) -> list[str]:
        """Units per split, cut from the split's image files; each split's unavailable tasks are logged once."""
        units, self._notes = [], {}
        for root in resolve_inputs(self.recipe.inputs):
            if not (root / "annotations").is_dir():
                raise ValueError(f"inputs: {root} has no annotations/ folder (COCO layout: annotations/instances_<split>.json)")
            splits = set()
            for path in (root / "annotations").glob("*.json"):
                for prefix in set(ANNOTATION_FILES.values()):
                    if path.stem.startswith(prefix + "_"):
                        splits.add(path.stem[len(prefix) + 1 :])
            for split in sorted(splits):
                notes = self.unavailable_tasks(root, split)
                for task, why in notes.items():
                    log.warning("coco %s/%s: task %s is unavailable: %s", root.name, split, task, why)
                if len(notes) == len(self.options.tasks):
                    log.warning("coco %s/%s: none of sentence.tasks is available; the split is skipped", root.name, split)
                    continue
                num_files = len(_image_files(root / split))
                for start in range(0, max(num_files, 1), self.options.images_per_unit):
                    units.append(f"{root / split}#{start}")
                    self._notes[units[-1]] = notes
        check_unique_names(units, "splits")
        return units

    def unavailable_tasks(self, root: Path, split: str) -> dict[str, str]:
        """{task: why} for requested tasks this split cannot provide at all (cheap: file checks only)."""
        notes = {}
        for task in self.options.tasks:
            path = root / "annotations" / f"{ANNOTATION_FILES[task]}_{split}.json"
            if task == "segmentation" and self.options.segmentation_from == "label_maps":
                if not (root / "labels" / split).is_dir():
                    notes[task] = f"segmentation_from: label_maps, but there is no labels/{split}/ folder"
            elif not path.is_file():
                notes[task] = f"no annotations/{path.name}"
            elif task == "segmentation" and not _mentions(path, b'"segmentation"'):
                notes[task] = f"annotations/{path.name} has no segmentation field"
        return notes

    def unit_notes(self, unit: str) -> dict:
        """What the run should report for this unit: `unavailable_tasks` {task: why} (empty if none)."""
        folder, _ = _parse_unit(unit)
        notes = getattr(self, "_notes", {}).get(unit)
        return {"unavailable_tasks": notes if notes is not None else self.unavailable_tasks(folder.parent, folder.name)}

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._items(*_parse_unit(unit)), max_items)

    def _items(self, folder: Path, start: int) -> Iterator[Item]:
        root, split = folder.parent, folder.name
        label_maps = self.options.segmentation_from == "label_maps"
        files: dict[str, _CocoFile] = {}
        for prefix in sorted({ANNOTATION_FILES[t] for t in self.options.tasks}):  # label maps too: the image list
            path = root / "annotations" / f"{prefix}_{split}.json"
            if not path.is_file():
                continue  # the task is unavailable: logged once by list_units, reported by unit_notes
            try:
                files[prefix] = _load_coco(str(path), path.stat().st_mtime_ns)
            except ValueError as err:
                if start == 0:
                    yield P.reject_item(f"annotations/{path.name}", P.BAD_JSON, str(err))
        tasks = [
            t for t in self.options.tasks
            if (t == "segmentation" and label_maps and (root / "labels" / split).is_dir())
            or (ANNOTATION_FILES[t] in files and (t != "segmentation" or label_maps or files[ANNOTATION_FILES[t]].has_masks))
        ]
        entries = {}  # file name -> image entry, over every annotation file of the split
        for coco in files.values():
            entries.update(coco.by_name)
        on_disk = _image_files(folder)
        for name in on_disk[start : start + self.options.images_per_unit]:
            if name not in entries:
                yield P.reject_item(f"{split}/{name}", P.MISSING_ANNOTATION, "not listed in any annotation file")
            else:
                yield from self._image_items(folder, entries[name], tasks, files)
        if start == 0:  # what concerns the whole split is reported once, by its first unit
            for name in sorted(set(entries) - set(on_disk)):
                yield P.reject_item(f"{split}/{name}", P.MISSING_IMAGE, f"listed in the annotations, but {folder / name} does not exist")
            for prefix, coco in sorted(files.items()):
                for ann_id, image_id in coco.orphans:
                    detail = f"image_id {image_id!r} is not among the file's images"
                    yield P.reject_item(f"annotations/{prefix}_{split}.json#{ann_id}", P.MISSING_IMAGE, detail)
            if label_maps and "segmentation" in tasks:
                stems = {Path(n).stem for n in entries}
                for path in sorted((root / "labels" / split).glob("*.png")):
                    if path.stem not in stems:
                        yield P.reject_item(f"labels/{split}/{path.name}", P.MISSING_IMAGE, "no image of this name in the annotations")

    def _image_items(self, folder: Path, entry: dict, tasks: list[str], files: dict) -> Iterator[Item]:
        key = f"{folder.name}/{entry['file_name']}"
        data = (folder / entry["file_name"]).read_bytes()
        image = P.decode_rgb(data, self.recipe.image.max_pixels)
        if image is None:
            yield P.input_item(key, data)  # the shared path rejects the image itself with its reason
            return
        out = []
        for task in tasks:
            anns = files[ANNOTATION_FILES[task]].annotations.get(entry["id"], []) if ANNOTATION_FILES[task] in files else []
            try:
                rendered = self._render(task, image, entry, anns, files, folder)
            except RejectError as err:
                out.append(P.reject_item(P.annotation_key(key, task), err.reason, err.detail))
                continue
            if rendered is not None:  # None: this image has no annotation of this type (not a reject)
                out.append(P.annotation_item(key, task, rendered))
        if not out:  # nothing to pair it with: say so instead of tokenizing it
            yield P.reject_item(key, UNANNOTATED, f"image id {entry['id']} has no annotation of {', '.join(tasks) or 'any task'}")
            return
        yield P.input_item(key, data)
        yield from out

    def _render(self, task: str, image: np.ndarray, entry: dict, anns: list[dict], files: dict, folder: Path) -> np.ndarray | None:
        height, width = image.shape[:2]
        if task == "segmentation" and self.options.segmentation_from == "label_maps":
            labels = _label_map(folder.parent / "labels" / folder.name, entry, height, width)
            return render.render_segmentation(P.fit_nearest(labels, self.recipe.image), self.options.ignore_label)
        if task == "pose":
            anns = [a for a in anns if a.get("num_keypoints", 1) > 0]
        if not anns:
            return None
        if (entry.get("width"), entry.get("height")) not in ((width, height), (None, None)):
            detail = f"annotations say {entry.get('width')}x{entry.get('height')}, image is {width}x{height}"
            raise RejectError(render.MISMATCHED_ANNOTATION, detail)
        if task == "detection":
            coco = files[ANNOTATION_FILES[task]]
            for ann in anns:
                coco_masks.check_category(ann, coco.palette_index, labels=False)
            return render.render_detection(image, [(ann.get("bbox", []), ann["category_id"]) for ann in anns])
        if task == "pose":
            background = image if self.options.pose_background == "image" else None
            people = [ann.get("keypoints", []) for ann in anns]
            return render.render_pose(people, height, width, background, self.options.pose_min_visibility)
        coco = files[ANNOTATION_FILES[task]]
        labels = coco_masks.semantic_labels(anns, coco.palette_index, height, width, self.options.crowd)
        if labels is None:
            return None  # annotations without any mask (boxes only)
        return render.render_segmentation(P.fit_nearest(labels, self.recipe.image))

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return self.pair(units, self.options.tasks)


def _parse_unit(unit: str) -> tuple[Path, int]:
    folder, _, start = unit.rpartition("#")
    return Path(folder), int(start)


def _image_files(folder: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted paths relative to it."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        out += [n if rel == "." else f"{rel}/{n}" for n in filenames if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(out)


def _mentions(path: Path, needle: bytes, chunk: int = 1 << 24) -> bool:
    """Whether the file's bytes contain `needle` (a fast scan; no JSON parse)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False


@dataclass
class _CocoFile:
    by_name: dict[str, dict]  # file name -> image entry
    annotations: dict[int, list[dict]]  # image id -> its annotations
    orphans: list[tuple]  # (annotation id, image id) of annotations whose image is not in the file
    palette_index: dict[int, int]  # category id -> label value (coco_masks.palette_indices)
    has_masks: bool  # some annotation has a `segmentation` field


def read_coco_json(path: str) -> tuple[dict, dict[int, list[dict]], list[tuple]]:
    """A COCO annotation file, its shape checked -> (data, image id -> its annotations,
    (annotation id, image id) of annotations whose image is not listed). ValueError when malformed."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError("expected an object with lists images, annotations and categories")
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"image entry without id or file_name: {str(im)[:100]}")
    if not all(isinstance(a, dict) for a in data["annotations"]) or not all(isinstance(c, dict) and "id" in c for c in data["categories"]):
        raise ValueError("annotations and categories must be objects (categories with an id)")
    annotations: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    orphans = []
    for ann in data["annotations"]:
        if ann.get("image_id") in annotations:
            annotations[ann["image_id"]].append(ann)
        else:
            orphans.append((ann.get("id"), ann.get("image_id")))
    return data, annotations, orphans


def split_units(inputs: list[str], prefix: str, images_per_unit: int) -> list[str]:
    """`<root>/<split>#<start>` units of every split that has `annotations/<prefix>_<split>.json`."""
    units = []
    for root in resolve_inputs(inputs):
        splits = sorted(p.stem[len(prefix) + 1:] for p in (root / "annotations").glob(f"{prefix}_*.json"))
        if not splits:
            raise ValueError(f"inputs: {root} has no annotations/{prefix}_<split>.json")
        for split in splits:
            count = len(_image_files(root / split))
            units += [f"{root / split}#{s}" for s in range(0, max(count, 1), images_per_unit)]
    check_unique_names(units, "splits")
    return units


def split_unit_items(unit: str, images_per_unit: int, prefix: str, load: Callable[[str, int], Any],
                     image_items: Callable[[Path, str, dict, Any], Iterable[Item]], listed_in: str) -> Iterator[Item]:
    """The items of one `<root>/<split>#<start>` unit (`split_units`) of a source reading one
    COCO-format file per split, `annotations/<prefix>_<split>.json` (the in-context sources).
    `load(path, mtime_ns)` gives the parsed file: an object with `by_name` (file name -> image
    entry) and `orphans` ((annotation id, image id) of annotations whose image is not listed).
    Each of the unit's image files, in name order, is `image_items(folder, key, entry, parsed)`'s,
    or a `missing_annotation` reject when the file does not list it ("not listed in the
    `listed_in`"); a file that cannot be read is one `bad_json` reject. What concerns the whole
    split (listed images not on disk, orphan annotations: `missing_image`) the first unit rejects."""
    folder, start = _parse_unit(unit)
    path = folder.parent / "annotations" / f"{prefix}_{folder.name}.json"
    try:
        parsed = load(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError) as err:
        if start == 0:
            yield P.reject_item(f"annotations/{path.name}", P.BAD_JSON, str(err))
        return
    on_disk = _image_files(folder)
    for name in on_disk[start : start + images_per_unit]:
        key = f"{folder.name}/{name}"
        entry = parsed.by_name.get(name)
        if entry is None:
            yield P.reject_item(key, P.MISSING_ANNOTATION, f"not listed in the {listed_in}")
        else:
            yield from image_items(folder, key, entry, parsed)
    if start == 0:
        for name in sorted(set(parsed.by_name) - set(on_disk)):
            yield P.reject_item(f"{folder.name}/{name}", P.MISSING_IMAGE, f"listed, but {folder / name} does not exist")
        for ann_id, image_id in parsed.orphans:
            yield P.reject_item(f"annotations/{path.name}#{ann_id}", P.MISSING_IMAGE, f"image_id {image_id!r} is not in the file")


@functools.lru_cache(maxsize=2)
def _load_coco(path: str, mtime_ns: int) -> _CocoFile:
    """Parse and index one annotation file; cached per process (a Ray worker reading several
    units of a split parses its JSON once; instances_train2017.json takes ~2-3 GB parsed)."""
    data, annotations, orphans = read_coco_json(path)
    by_name = {im["file_name"]: im for im in data["images"]}
    has_masks = any("segmentation" in ann for ann in data["annotations"])
    return _CocoFile(by_name, annotations, orphans, coco_masks.palette_indices(data["categories"]), has_masks)


def _label_map(labels_dir: Path, entry: dict, height: int, width: int) -> np.ndarray:
    path = labels_dir / f"{Path(entry['file_name']).stem}.png"
    if not path.is_file():
        raise RejectError(P.MISSING_ANNOTATION, f"no label map {path.name} in {labels_dir}")
    try:
        labels = np.asarray(Image.open(path))
    except OSError as err:
        raise RejectError(render.BAD_ANNOTATION, f"{path.name}: {err}") from None
    if labels.shape != (height, width):
        raise RejectError(render.MISMATCHED_ANNOTATION, f"label map is {labels.shape}, image is {(height, width)}")
    return labels
