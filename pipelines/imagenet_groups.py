"""`imagenet_groups`: 16-image sentences of k images from each of 16/k categories.

    uvd run recipes/imagenet_groups.yaml --set inputs=/data/imagenet/train

Reads the ImageNet train layout (`ROOT/<wnid>/*.JPEG`); k is drawn per sentence from
`sentence.k_weights` (k in {2, 4, 8, 16}). Each image is used at most once; images left
over when no more groups can be formed are recorded as `unused_remainder` rejects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from uvd import records as R
from uvd.records import ImageRecord, Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import Source, UnitImages, check_unique_names, resolve_inputs

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


@dataclass
class ImagenetGroupsOptions:
    k_weights: dict[int, float] = field(default_factory=lambda: {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})
    images_per_sentence: int = 16

    def validate(self, path: str) -> None:
        n = self.images_per_sentence
        if not 1 <= n <= 16:
            raise ValueError(f"{path}.images_per_sentence: must be in 1..16, got {n}")
        for k, w in self.k_weights.items():
            if k < 1 or n % k:
                raise ValueError(f"{path}.k_weights: k={k} does not divide images_per_sentence={n}")
            if w < 0:
                raise ValueError(f"{path}.k_weights.{k}: weight must be >= 0, got {w}")
        if not any(w > 0 for w in self.k_weights.values()):
            raise ValueError(f"{path}.k_weights: at least one weight must be > 0")


@register_source
class ImagenetGroupsSource(Source):
    name = "imagenet_groups"
    Options = ImagenetGroupsOptions

    def list_units(self) -> list[str]:
        units = []
        for root in resolve_inputs(self.recipe.inputs):
            if not root.is_dir():
                raise ValueError(f"inputs: {root} is not a folder of class folders (ROOT/<wnid>/*.JPEG)")
            units.extend(str(d) for d in sorted(root.iterdir()) if d.is_dir())
        check_unique_names(units, "class folders")
        return units

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        folder = Path(unit)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:max_items]:
            yield Item(f"{folder.name}/{path.name}", data=path.read_bytes(), meta={"category": folder.name})

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        n = self.options.images_per_sentence
        remaining: dict[str, list[ImageRecord]] = {}
        for unit in units:
            images = list(unit.images)
            self.rng.shuffle(images)
            remaining[Path(unit.unit).name] = images
        ks = sorted(k for k, w in self.options.k_weights.items() if w > 0)
        while True:
            feasible = [k for k in ks if sum(len(v) >= k for v in remaining.values()) >= n // k]
            if not feasible:
                break
            k = self.rng.choices(feasible, weights=[self.options.k_weights[k] for k in feasible])[0]
            categories = self.rng.sample(sorted(c for c, v in remaining.items() if len(v) >= k), n // k)
            images = []
            for category in categories:
                images.extend(remaining[category][:k])
                remaining[category] = remaining[category][k:]
            yield Sentence(f"category_k{k}", images, meta={"k": k, "categories": categories})
        for category in sorted(remaining):
            for image in remaining[category]:
                yield Reject(image.key, R.UNUSED_REMAINDER, f"no room for it in a group of {category}", category)
