"""`imagenet_groups`: 16-image sentences of k images from each of 16/k categories.

    uvd run recipes/imagenet_groups.yaml --set inputs=/data/imagenet/train

Reads the ImageNet train layout (`ROOT/<wnid>/*.JPEG`); k is drawn per sentence from
`sentence.k_weights` (k in {2, 4, 8, 16}). Each image is used at most once; images left
over when no more groups can be formed are recorded as `unused_remainder` rejects.
One unit per class folder; the grouping is planned from per-category counts alone (`plan`, one
Ray task), and each part's writer materializes its share of the sentences (`materialize`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from uvd import records as R
from uvd.assemble import part_images, read_duplicates
from uvd.dedup import losers_per_unit
from uvd.layout import PLAN_DIR, atomic_write_bytes
from uvd.records import ImageRecord, Item, Reject, Sentence
from uvd.registry import register_source
from uvd.shards import table_bytes
from uvd.source import IMAGE_SUFFIXES, Source, UnitImages, check_unique_names, resolve_inputs
from uvd.storage import read_table



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
    assembly = "global"  # a sentence takes images from 16/k categories (units)
    input_hint = "class folders ROOT/<wnid>/*.JPEG"

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

    def plan_groups(self, kept: np.ndarray) -> tuple[list[tuple[int, list[int], list[int]]], np.ndarray]:
        """From kept image counts per category alone: sentences as (k, categories, offsets) and the
        images used per category. k is drawn by weight among the feasible k, then 16/k categories
        among those with k images left; each category is consumed in its shuffled order."""
        n = self.options.images_per_sentence
        remaining = np.asarray(kept, np.int64).copy()
        rng = np.random.default_rng([self.recipe.seed, 1])
        ks = np.array(sorted(k for k, w in self.options.k_weights.items() if w > 0))
        weights = np.array([self.options.k_weights[int(k)] for k in ks], float)
        sentences = []
        while True:
            feasible = np.array([np.count_nonzero(remaining >= k) >= n // k for k in ks])
            if not feasible.any():
                break
            p = weights * feasible
            k = int(rng.choice(ks, p=p / p.sum()))
            cats = np.sort(rng.choice(np.flatnonzero(remaining >= k), n // k, replace=False))
            sentences.append((k, cats.tolist(), (kept[cats] - remaining[cats]).tolist()))
            remaining[cats] -= k
        return sentences, np.asarray(kept) - remaining

    def _shuffled(self, unit_images: UnitImages) -> list[ImageRecord]:
        records = list(unit_images.images)
        random.Random(f"{self.recipe.seed}:{Path(unit_images.unit).name}").shuffle(records)
        return records

    def _sentences(self, plan, shuffled, names) -> Iterator[Sentence]:
        for k, cats, offsets in plan:
            images = [im for c, o in zip(cats, offsets) for im in shuffled(c)[o: o + k]]
            yield Sentence(f"category_k{k}", images, meta={"k": k, "categories": [Path(names[c]).name for c in cats]})

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        """In memory, over every unit at once: the same sentences as plan + materialize on a run."""
        units = list(units)
        plan, used = self.plan_groups(np.array([len(u.images) for u in units], np.int64))
        shuffled = [self._shuffled(u) for u in units]
        yield from self._sentences(plan, lambda c: shuffled[c], [u.unit for u in units])
        for c, u in enumerate(units):
            for image in shuffled[c][used[c]:]:
                yield Reject(image.key, R.UNUSED_REMAINDER, f"no room for it in a group of {Path(u.unit).name}", u.unit)

    def plan(self, run_dir: Path, parts: list[dict]) -> None:
        """Plan from per-unit kept counts (after dedup) and deal the sentences to the parts in
        contiguous runs; each part's writer materializes its own and its units' remainders."""
        units = [(u, p["index"], name) for p in parts for (u, _, _), name in zip(p["per_unit"], p["units"])]
        losers = losers_per_unit(run_dir)
        kept = np.array([k - losers.get(u, 0) for p in parts for u, _, k in p["per_unit"]], np.int64)
        sentences, used = self.plan_groups(kept)
        deal = (np.arange(len(sentences)) * len(parts) // max(len(sentences), 1)).astype(np.int32)
        plan = pa.table({
            "part": pa.array(deal, pa.int32()),
            "k": pa.array([k for k, _, _ in sentences], pa.int32()),
            "units": pa.array([c for _, c, _ in sentences], pa.list_(pa.int32())),
            "offsets": pa.array([o for _, _, o in sentences], pa.list_(pa.int32())),
        })
        unit_table = pa.table({
            "unit": pa.array([u for u, _, _ in units], pa.int32()),
            "part": pa.array([p for _, p, _ in units], pa.int32()),
            "name": pa.array([name for _, _, name in units], pa.string()),
            "used": pa.array(used.tolist(), pa.int32()),
        })
        plan_dir = run_dir / PLAN_DIR  # a local or object-store path (uvd.storage)
        atomic_write_bytes(plan_dir / "sentences.parquet", table_bytes(plan, row_group_size=4096))
        atomic_write_bytes(plan_dir / "units.parquet", table_bytes(unit_table))

    def materialize(self, part, images: list[UnitImages], run_dir: Path) -> Iterator[Sentence | Reject]:
        run = run_dir
        rows = read_table(run / PLAN_DIR / "sentences.parquet", filters=[("part", "=", part.index)]).to_pylist()
        table = read_table(run / PLAN_DIR / "units.parquet").to_pydict()
        names = dict(zip(table["unit"], table["name"]))
        used = dict(zip(table["unit"], table["used"]))
        units_of: dict[int, list[int]] = {}
        for unit_id, p in zip(table["unit"], table["part"]):
            units_of.setdefault(p, []).append(unit_id)
        part_of = {u: p for p, ids in units_of.items() for u in ids}
        loaded = {part.first_unit + j: unit_images for j, unit_images in enumerate(images)}
        shuffled: dict[int, list[ImageRecord]] = {}

        def category(unit_id: int) -> list[ImageRecord]:
            """The unit's kept images in its seeded shuffled order (other parts' read from their work files)."""
            if unit_id not in shuffled:
                if unit_id not in loaded:
                    p = part_of[unit_id]
                    ids = sorted(units_of[p])
                    dups = read_duplicates(run, p) if self.recipe.filters.dedup else {}
                    other, _ = part_images(run, p, [names[u] for u in ids], ids[0], dups)
                    loaded.update(zip(ids, other))
                shuffled[unit_id] = self._shuffled(loaded[unit_id])
            return shuffled[unit_id]

        yield from self._sentences([(r["k"], r["units"], r["offsets"]) for r in rows], category, names)
        for j, unit_images in enumerate(images):
            unit_id = part.first_unit + j
            name = Path(unit_images.unit).name
            for image in category(unit_id)[used.get(unit_id, 0):]:
                yield Reject(image.key, R.UNUSED_REMAINDER, f"no room for it in a group of {name}", unit_images.unit)
