"""`semantic_folders`: semantic-segmentation datasets in their own folder layouts, rendered and paired.

    uvd run recipes/semantic_folders.yaml --set inputs=/data/ADEChallengeData2016 --out out/ade20k

- ADE20K (SceneParsing): `ADEChallengeData2016/images/<split>/NAME.jpg` + `annotations/<split>/NAME.png`;
  values 1..150 are its classes, drawn with ADE20K's palette; 0 ("other") is black.
- Pascal VOC: `VOC2012/JPEGImages/NAME.jpg` + `SegmentationClass/NAME.png` (palette PNG), the split's
  names in `ImageSets/Segmentation/<split>.txt` (without it: every label map); values 1..20 in the
  VOC palette, 0 background and 255 (object boundaries, "void") black.
Units: a split's images in name order, `sentence.images_per_unit` each; task `segmentation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from uvd.pipelines import pairing as P
from uvd.pipelines import render
from uvd.records import Item, Reject, RejectError, Sentence
from uvd.registry import register_source
from uvd.source import (
    IMAGE_SUFFIXES, Source, UnitImages, check_unique_names, clash_rejects, files_by_stem, limit_items, resolve_inputs,
)

TASK = "segmentation"
LAYOUTS = ("auto", "ade20k", "voc")
NUM_CLASSES = {"ade20k": 150, "voc": 20}
PALETTES = {"ade20k": render.ADE20K_PALETTE, "voc": render.PALETTE}
IGNORE = {"ade20k": None, "voc": render.IGNORE_LABEL}  # ADE20K's 0 is black in its palette already


@dataclass
class SemanticFoldersOptions(P.PairingOptions):
    layout: str = "auto"  # auto (from the folders) | ade20k | voc
    splits: list[str] = field(default_factory=list)  # empty: every split (VOC: all but trainval, = train + val)
    images_per_unit: int = 1000

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.layout not in LAYOUTS:
            raise ValueError(f"{path}.layout: {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.images_per_unit < 1:
            raise ValueError(f"{path}.images_per_unit: must be >= 1, got {self.images_per_unit}")


def find_dataset(root: Path, layout: str) -> tuple[str, Path]:
    """(layout, dataset folder) for an input folder: the dataset itself or a folder that holds it."""
    candidates = {
        "ade20k": [root, root / "ADEChallengeData2016"],
        "voc": [root, *(base / name for base in (root, root / "VOCdevkit") for name in ("VOC2012", "VOC2007"))],
    }
    marks = {"ade20k": ("images", "annotations"), "voc": ("JPEGImages", "SegmentationClass")}
    for name in ([layout] if layout != "auto" else ["ade20k", "voc"]):
        for folder in candidates[name]:
            if all((folder / m).is_dir() for m in marks[name]):
                return name, folder
    want = "ADEChallengeData2016/{images,annotations}/<split>/ or VOC2012/{JPEGImages,SegmentationClass}/"
    raise ValueError(f"inputs: {root} is not a {'semantic-segmentation' if layout == 'auto' else layout} folder (expected {want})")


@register_source
class SemanticFoldersSource(P.PairsLabels, Source):
    name = "semantic_folders"
    Options = SemanticFoldersOptions
    fixed_tasks = (TASK,)
    units_per_part = 1
    input_hint = "ADE20K or Pascal VOC roots"

    def list_units(self) -> list[str]:
        units = []
        for root in resolve_inputs(self.recipe.inputs):
            layout, folder = find_dataset(root, self.options.layout)
            available = self._splits(layout, folder)
            wanted = self.options.splits or [s for s in available if not (layout == "voc" and s == "trainval")]
            for split in wanted:
                if split not in available:
                    raise ValueError(f"sentence.splits: {folder} has no split {split!r} (it has {', '.join(available) or 'none'})")
                count = len(self._names(layout, folder, split))
                units += [f"{folder}/{split}#{start}" for start in range(0, max(count, 1), self.options.images_per_unit)]
        check_unique_names(units, "splits")
        return units

    @staticmethod
    def _splits(layout: str, folder: Path) -> list[str]:
        if layout == "ade20k":
            return sorted(p.name for p in (folder / "images").iterdir() if p.is_dir())
        lists = folder / "ImageSets" / "Segmentation"
        return sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else ["all"]

    @staticmethod
    def _names(layout: str, folder: Path, split: str) -> list[str]:
        """The split's image stems, sorted (ADE20K: its image files; VOC: its list, or every label map)."""
        if layout == "ade20k":
            return sorted({p.stem for p in (folder / "images" / split).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
        if split == "all":
            return sorted(p.stem for p in (folder / "SegmentationClass").glob("*.png"))
        lines = (folder / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        return sorted(set(lines))

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._items(unit), max_items)

    def _items(self, unit: str) -> Iterator[Item]:
        where, _, start_text = unit.rpartition("#")
        folder, split, start = Path(where).parent, Path(where).name, int(start_text)
        layout, _ = find_dataset(folder, self.options.layout)
        if layout == "ade20k":
            image_dir, label_dir = folder / "images" / split, folder / "annotations" / split
        else:
            image_dir, label_dir = folder / "JPEGImages", folder / "SegmentationClass"
        images, clashes = files_by_stem(image_dir, IMAGE_SUFFIXES, on_clash="reject")
        names = self._names(layout, folder, split)
        prefix = f"{folder.name}/{split}"
        for stem in names[start : start + self.options.images_per_unit]:
            if stem in clashes:
                yield from clash_rejects({stem: clashes[stem]}, prefix)
                continue
            if stem not in images:
                yield P.reject_item(f"{prefix}/{stem}", P.MISSING_IMAGE, f"no {image_dir.name}/{stem}.jpg for it")
                continue
            key = f"{prefix}/{images[stem].name}"
            data = images[stem].read_bytes()
            yield P.input_item(key, data)
            image = P.decode_rgb(data, self.recipe.image.max_pixels)
            if image is None:
                continue  # the shared path rejects the image with its reason
            try:
                labels = _label_map(label_dir / f"{stem}.png", image.shape[:2], layout)
                rendered = render.render_segmentation(P.fit_nearest(labels, self.recipe.image), IGNORE[layout], PALETTES[layout])
            except RejectError as err:
                yield P.reject_item(P.annotation_key(key, TASK), err.reason, err.detail)
                continue
            yield P.annotation_item(key, TASK, rendered)
        if start == 0 and layout == "ade20k" and label_dir.is_dir():  # label maps of no image, once per split
            listed = set(names)
            for path in sorted(label_dir.glob("*.png")):
                if path.stem not in listed:
                    yield P.reject_item(f"{prefix}/{path.name}#{TASK}", P.MISSING_IMAGE, f"no images/{split}/{path.stem}.* for it")

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return self.pair(units, [TASK])


def _label_map(path: Path, shape: tuple[int, int], layout: str) -> np.ndarray:
    """A single-channel class-id PNG (grayscale, or a palette PNG's indices), checked against the image."""
    if not path.is_file():
        raise RejectError(P.MISSING_ANNOTATION, f"no label map {path.parent.name}/{path.name}")
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I;16", "I"):
                raise RejectError(render.BAD_ANNOTATION, f"{path.name}: mode {img.mode}, expected class ids (L or P)")
            labels = np.asarray(img)
    except OSError as err:
        raise RejectError(render.BAD_ANNOTATION, f"{path.name}: {err}") from None
    if labels.shape != shape:
        raise RejectError(render.MISMATCHED_ANNOTATION, f"{path.name} is {labels.shape}, image is {shape}")
    valid = labels <= NUM_CLASSES[layout]
    if layout == "voc":
        valid |= labels == render.IGNORE_LABEL
    if not valid.all():
        bad = sorted(set(np.unique(labels[~valid]).tolist()))[:5]
        raise RejectError(render.BAD_ANNOTATION, f"{path.name}: class ids {bad} outside 0..{NUM_CLASSES[layout]}")
    return labels
