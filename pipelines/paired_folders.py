"""`paired_folders`: pairs a dataset gives as two folders (input, target) matched by name.

    uvd run recipes/paired_folders.yaml --set inputs=/data/rain100h --set sentence.task=deraining

For style transfer, deraining, denoising, low-light enhancement, stereo (left -> right), ...:
each root holds `<input_dir>/NAME.ext` and `<target_dir>/NAME.ext` (extensions may differ).
Units of `sentence.pairs_per_unit` names per root (pairs shuffled within a unit); the recipe names the task. An input without target is `missing_annotation`,
a target without input `missing_image`; 8 pairs make a sentence {x1, y1, ... x8, y8}.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from uvd.pipelines import pairing as P
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import (
    IMAGE_SUFFIXES, Source, UnitImages, check_unique_names, chunk_units, files_by_stem, limit_items, resolve_inputs, split_chunk,
)

EXAMPLE_TASKS = ("style_transfer", "deraining", "denoising", "low_light", "stereo")


@dataclass
class PairedOptions(P.PairingOptions):
    task: str = "paired"  # the task name in the shards: deraining, denoising, low_light, stereo, ...
    input_dir: str = "input"  # folder of inputs under each root (stereo: left)
    target_dir: str = "target"  # folder of targets under each root (stereo: right)
    pairs_per_unit: int = 1000  # a root is read (and paired) in units of this many names

    def validate(self, path: str) -> None:
        super().validate(path)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.task) or self.task in (P.INPUT, P.TUPLE_TASK):
            raise ValueError(f"{path}.task: {self.task!r} must be a lowercase name such as {', '.join(EXAMPLE_TASKS)}")
        if self.pairs_per_unit < 1:
            raise ValueError(f"{path}.pairs_per_unit: must be >= 1, got {self.pairs_per_unit}")
        if not self.input_dir or not self.target_dir or self.input_dir == self.target_dir:
            raise ValueError(f"{path}.input_dir/target_dir: must be two different folder names")


@register_source
class PairedFoldersSource(Source):
    name = "paired_folders"
    Options = PairedOptions
    units_per_part = 1
    input_hint = "roots with input/ and target/ folders"

    def list_units(self) -> list[str]:
        roots = resolve_inputs(self.recipe.inputs)
        o = self.options
        for root in roots:
            if not (root / o.input_dir).is_dir() or not (root / o.target_dir).is_dir():
                raise ValueError(
                    f"inputs: {root} needs folders {o.input_dir}/ and {o.target_dir}/ "
                    "(set sentence.input_dir and sentence.target_dir to your folder names)"
                )
        check_unique_names(roots, "input folders")
        return [u for r in roots for u in chunk_units(r, len(self._stems(r)), o.pairs_per_unit)]

    def _stems(self, root: Path) -> list[str]:
        o = self.options
        return sorted(_by_stem(root / o.input_dir).keys() | _by_stem(root / o.target_dir).keys())

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._items(*split_chunk(unit)), max_items)

    def _items(self, root: Path, start: int) -> Iterator[Item]:
        o = self.options
        inputs, targets = _by_stem(root / o.input_dir), _by_stem(root / o.target_dir)
        for stem in self._stems(root)[start: start + o.pairs_per_unit]:
            source, target = inputs.get(stem), targets.get(stem)
            if source is None:
                yield P.reject_item(f"{root.name}/{o.target_dir}/{target.name}", P.MISSING_IMAGE, f"no {o.input_dir}/{stem}.*")
                continue
            key = f"{root.name}/{o.input_dir}/{source.name}"
            if target is None:
                yield P.reject_item(key, P.MISSING_ANNOTATION, f"no {o.target_dir}/{stem}.*")
                continue
            yield P.input_item(key, source.read_bytes())
            yield P.target_item(f"{root.name}/{o.target_dir}/{target.name}", key, o.task, target.read_bytes())

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return P.assemble_annotated(units, [self.options.task], self.options, self.rng)


def _by_stem(folder: Path) -> dict[str, Path]:
    """Checked on the driver too (list_units): two files of one stem make the pairs ambiguous, a ValueError."""
    return files_by_stem(folder, IMAGE_SUFFIXES, on_clash="error")[0]
