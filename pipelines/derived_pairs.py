"""`derived_pairs`: pairs made from any folder of images: colorization and inpainting.

    uvd run recipes/derived_pairs.yaml --set inputs=/data/photos --out out/derived

Colorization: the image's grayscale -> the image. Inpainting: the image with
`num_boxes` random black boxes (sides a `box_size` fraction of the image's) -> the image.
The boxes are drawn from the recipe seed and the image's key, so they never depend on
which worker reads which file. Units are chunks of `files_per_unit` files of each folder.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from uvd.pipelines import pairing as P
from uvd.pipelines import render
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import IMAGE_SUFFIXES, Source, UnitImages, limit_items, resolve_inputs, split_chunk

TASKS = ("colorization", "inpainting")


@dataclass
class DerivedOptions(P.PairingOptions):
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_boxes: list[int] = field(default_factory=lambda: [1, 3])  # inpainting: [min, max] boxes per image
    box_size: list[float] = field(default_factory=lambda: [0.1, 0.3])  # [min, max] box side / image side
    files_per_unit: int = 1000

    def validate(self, path: str) -> None:
        super().validate(path)
        P.check_tasks(f"{path}.tasks", self.tasks, TASKS)
        if len(self.num_boxes) != 2 or not 1 <= self.num_boxes[0] <= self.num_boxes[1]:
            raise ValueError(f"{path}.num_boxes: expected [min, max] with 1 <= min <= max, got {self.num_boxes}")
        if len(self.box_size) != 2 or not 0 < self.box_size[0] <= self.box_size[1] <= 1:
            raise ValueError(f"{path}.box_size: expected [min, max] with 0 < min <= max <= 1, got {self.box_size}")
        if self.files_per_unit < 1:
            raise ValueError(f"{path}.files_per_unit: must be >= 1, got {self.files_per_unit}")


@register_source
class DerivedPairsSource(P.PairsLabels, Source):
    name = "derived_pairs"
    Options = DerivedOptions
    units_per_part = 1
    input_hint = "folders of images"

    def list_units(self) -> list[str]:
        units = []
        for folder in resolve_inputs(self.recipe.inputs):
            if not folder.is_dir():
                raise ValueError(f"inputs: {folder} is not a folder of images")
            num_files = len(_images(folder))
            units.extend(f"{folder}::{start}" for start in range(0, num_files, self.options.files_per_unit))
        return units

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._unit_items(*split_chunk(unit)), max_items)

    def _unit_items(self, folder: Path, start: int) -> Iterator[Item]:
        for path in _images(folder)[start : start + self.options.files_per_unit]:
            yield from self._items(f"{folder.name}/{path.name}", path.read_bytes())

    def _items(self, key: str, data: bytes) -> Iterator[Item]:
        yield P.input_item(key, data)
        image = P.decode_rgb(data, self.recipe.image.max_pixels)
        if image is None:
            return  # the shared path rejects the image with its reason
        if "colorization" in self.options.tasks:
            yield P.annotation_item(key, "colorization", render.grayscale(image))
        if "inpainting" in self.options.tasks:
            rng = random.Random(f"{self.recipe.seed}/{key}")
            height, width = image.shape[:2]
            count = rng.randint(*self.options.num_boxes)
            boxes = render.random_boxes(rng, width, height, count, *self.options.box_size)
            yield P.annotation_item(key, "inpainting", render.black_boxes(image, boxes))

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return self.pair(units, self.options.tasks, derived_first=TASKS)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
