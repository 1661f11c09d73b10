"""What the annotated sources share: items that pair up, and how pairs become sentences.

A source's `read_unit` yields each input image and each of its rendered annotations as
separate items whose meta names their `pair` (the input's key) and `role` (`input`, or the
annotation type); so each image is tokenized once. `assemble_annotated` then builds
  - pairs: `pairs_per_sentence` (input, annotation) pairs of one type, {x1, y1, ... x8, y8},
    re-shuffled for each of `epochs` epochs;
  - multi-annotation tuples (`tuples: true`): m images from {x, a1 ... ak}, 2 <= m <= k+1 <= 16;
and records every image that no sentence used as a reject. All of it unit by unit (an input and
its annotations always lie in one unit); with `shuffle_units: W` the runner hands over windows of
W consecutive units merged into one, so pairs are shuffled across W units.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
import io
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvd import records as R
from uvd.recipe import ImageOptions
from uvd.records import ImageRecord, Item, Reject, Sentence
from uvd.source import UnitImages

INPUT = "input"
TUPLE_TASK = "multi_annotation"
MAX_IMAGES = 16

# Reject reasons of annotated sources (renderers add bad_annotation, bad_box, bad_keypoints,
# mismatched_annotation: pipelines/render.py).
MISSING_ANNOTATION = R.reason("missing_annotation", "an input whose annotation file is absent")
MISSING_IMAGE = R.MISSING_IMAGE  # an annotation (file or JSON entry) whose image is absent
BAD_JSON = R.reason("bad_json", "an annotation file that is not valid JSON of the expected shape")
UNPAIRED = R.reason("unpaired", "tokenized, but its partner was rejected (or it has no annotation at all)")


@dataclass
class PairingOptions:
    pairs_per_sentence: int = 8  # (input, annotation) pairs per sentence: 8 -> 16 images
    epochs: int = 1  # passes over the pairs, each with a different random pairing (LVM used several)
    shuffle_units: int = 1  # pairs are shuffled across windows of this many consecutive units (1: within a unit)
    tuples: bool = False  # also build multi-annotation tuples {x, a1 ... ak} per input image
    tuples_per_image: int = 1
    min_tuple_size: int = 2  # m is drawn uniformly from [min_tuple_size, k+1]

    def validate(self, path: str) -> None:
        if not 1 <= self.pairs_per_sentence <= MAX_IMAGES // 2:
            raise ValueError(f"{path}.pairs_per_sentence: must be in 1..8, got {self.pairs_per_sentence}")
        if self.epochs < 1:
            raise ValueError(f"{path}.epochs: must be >= 1, got {self.epochs}")
        if self.shuffle_units < 1:
            raise ValueError(f"{path}.shuffle_units: must be >= 1, got {self.shuffle_units}")
        if self.tuples_per_image < 1:
            raise ValueError(f"{path}.tuples_per_image: must be >= 1, got {self.tuples_per_image}")
        if not 2 <= self.min_tuple_size <= MAX_IMAGES:
            raise ValueError(f"{path}.min_tuple_size: must be in 2..16, got {self.min_tuple_size}")


def check_tasks(path: str, tasks: list[str], known: tuple[str, ...]) -> None:
    if not tasks:
        raise ValueError(f"{path}: name at least one of {', '.join(known)}")
    for task in tasks:
        if task not in known:
            raise ValueError(f"{path}: {task!r} is not one of {', '.join(known)}")


def input_item(key: str, data: bytes) -> Item:
    return Item(key, data=data, meta={"pair": key, "role": INPUT})


def annotation_key(key: str, role: str) -> str:
    return f"{key}#{role}"


def annotation_item(key: str, role: str, array: np.ndarray) -> Item:
    """The rendered annotation of input `key`: (H, W, 3) uint8 pixels."""
    return Item(annotation_key(key, role), array=np.ascontiguousarray(array, np.uint8), meta={"pair": key, "role": role})


def target_item(key: str, pair: str, role: str, data: bytes) -> Item:
    """A given target image (paired folders): its own file, paired with input `pair`."""
    return Item(key, data=data, meta={"pair": pair, "role": role})


def reject_item(key: str, reason: str, detail: str) -> Item:
    return Item(key, reject=reason, detail=detail[:300])


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels, or None when the bytes are not a decodable image of allowed
    size (the shared path then rejects them with the precise reason)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > max_pixels:
            return None
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def fit_nearest(labels: np.ndarray, image: ImageOptions) -> np.ndarray:
    """A (H, W) label map brought to the recipe's output geometry with nearest-neighbour
    sampling (the same crop as the shared path's), so no blended, off-palette colors appear.
    The shared path leaves an image that already has the output size untouched."""
    height, width = labels.shape
    size = image.size
    if image.resize == "center_crop":
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    else:
        box = (0, 0, width, height)
    mode = "I" if labels.max(initial=0) > 255 else "L"
    img = Image.fromarray(labels.astype(np.int32 if mode == "I" else np.uint8), mode=mode)
    return np.asarray(img.resize((size, size), Image.NEAREST, box=box)).astype(labels.dtype)


def pair_sentences(
    pairs: list[tuple[ImageRecord, ImageRecord]], task: str, options: PairingOptions, rng, used: set[str]
) -> Iterator[Sentence]:
    """Each epoch shuffles the pairs and cuts them into sentences of `pairs_per_sentence`."""
    n = options.pairs_per_sentence
    seen: set[tuple[int, ...]] = set()
    for epoch in range(options.epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order) - n + 1, n):
            chosen = tuple(order[start : start + n])
            if chosen in seen:  # a tiny set can repeat a pairing: the same sentence twice is no new data
                continue
            seen.add(chosen)
            images = [im for i in chosen for im in pairs[i]]
            used.update(im.key for im in images)
            yield Sentence(task, images, meta={"annotation": task, "layout": "pairs", "epoch": epoch, "num_pairs": n})


def tuple_sentences(
    groups: dict[str, dict[str, ImageRecord]], tasks: list[str], options: PairingOptions, rng, used: set[str]
) -> Iterator[Sentence]:
    """Per input with k >= 1 annotations: m of {x, a1 ... ak} in that order, m in [min, k+1]."""
    for pair in sorted(groups):
        group = groups[pair]
        roles = [r for r in [INPUT, *tasks] if r in group][:MAX_IMAGES]
        if INPUT not in group or len(roles) < 2:
            continue
        seen: set[tuple[str, ...]] = set()
        for _ in range(options.tuples_per_image):
            m = rng.randint(min(options.min_tuple_size, len(roles)), len(roles))
            chosen = tuple(roles[i] for i in sorted(rng.sample(range(len(roles)), m)))
            if chosen in seen:
                continue
            seen.add(chosen)
            images = [group[r] for r in chosen]
            used.update(im.key for im in images)
            yield Sentence(TUPLE_TASK, images, meta={"annotation": list(chosen), "layout": "tuple", "epoch": 0})


class PairsLabels:
    """Mixin of the pairing sources: the run's labeler renderings (meta `pair`, `role` = the
    labeler's name, as file annotations) join their task list, so labelers pair exactly like file
    annotations and tuples mix both. The runner sets `label_tasks` before assembling."""

    pairs_labels = True
    label_tasks: tuple[str, ...] = ()
    fixed_tasks: tuple[str, ...] = ()  # annotation roles the source always reads (beyond sentence.tasks)

    def pair(self, units: Iterable[UnitImages], tasks: list[str], derived_first: tuple[str, ...] = ()) -> Iterator[Sentence | Reject]:
        options = self.options
        if len(self.label_tasks) >= 2 and not options.tuples:  # several labelers: m-tuples over them too
            options = dataclasses.replace(options, tuples=True)
        return assemble_annotated(units, [*tasks, *self.label_tasks], options, self.rng, derived_first)


def unit_rng(rng, unit: str) -> random.Random:
    """A unit's own generator, derived from the source's seeded `rng` (its state is read, not
    advanced) and the unit's name: a unit's sentences do not depend on which other units exist
    or in which order they are assembled, nor on where the data lives (only the unit's last path
    component counts)."""
    digest = hashlib.sha256(repr(rng.getstate()).encode() + b"\x1f" + Path(unit).name.encode()).hexdigest()
    return random.Random(digest)


def assemble_annotated(
    units: Iterable[UnitImages], tasks: list[str], options: PairingOptions, rng, derived_first: tuple[str, ...] = ()
) -> Iterator[Sentence | Reject]:
    """Per unit: pair sentences per task (in `tasks` order), then tuples; every unused image is a Reject.

    Pairing is unit-local (pairs are shuffled within a unit, per epoch, with the unit's own
    `unit_rng`), so memory stays bounded by a unit and units can be assembled independently.
    Pairs are (input, annotation), except for tasks in `derived_first`, whose rendered image is
    the question and the input the answer (colorization: grayscale -> color)."""
    for unit in units:
        yield from assemble_unit(unit, tasks, options, unit_rng(rng, unit.unit), derived_first)


def assemble_unit(
    unit: UnitImages, tasks: list[str], options: PairingOptions, rng, derived_first: tuple[str, ...] = ()
) -> Iterator[Sentence | Reject]:
    """One unit's sentences and rejects (see `assemble_annotated`)."""
    groups: dict[str, dict[str, ImageRecord]] = {}
    for image in unit.images:
        pair, role = image.meta.get("pair", image.key), image.meta.get("role", INPUT)
        groups.setdefault(pair, {})[role] = image
    used: set[str] = set()
    for task in tasks:
        pairs = [(g[INPUT], g[task]) for _, g in sorted(groups.items()) if INPUT in g and task in g]
        if task in derived_first:
            pairs = [(a, x) for x, a in pairs]
        yield from pair_sentences(pairs, task, options, rng, used)
    if options.tuples:
        yield from tuple_sentences(groups, tasks, options, rng, used)
    name = unit.unit
    for pair in sorted(groups):
        group = groups[pair]
        for role in sorted(group):
            image = group[role]
            if image.key in used:
                continue
            if role == INPUT and len(group) == 1:
                yield Reject(image.key, UNPAIRED, "none of its annotations or targets survived", name)
            elif INPUT not in group:
                yield Reject(image.key, UNPAIRED, f"its input {pair} was rejected", name)
            elif role != INPUT and role not in tasks:
                yield Reject(image.key, UNPAIRED, f"annotation type {role!r} is not in sentence.tasks", name)
            else:
                yield Reject(image.key, R.UNUSED_REMAINDER, "left over when pairs were cut into sentences", name)
