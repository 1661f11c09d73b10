"""`dense_annotations`: depth, surface normals and edges, matched to images by name, paired.

    uvd run recipes/dense_annotations.yaml --set inputs=/data/nyu --out out/dense

Layout per root (units of `sentence.images_per_unit` images; pairs are shuffled within a unit): `images/NAME.jpg|png` and any of `depth/NAME.png|npy`
(16-bit PNG or float .npy), `normals/NAME.png|npy` (RGB or unit vectors), `edges/NAME.png|npy`.
Edges can instead be computed with Canny (`sentence.edges_from: canny`). Tasks `depth`,
`normals`, `edges`; a missing, unreadable or wrong-sized annotation is rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from uvd.pipelines import pairing as P
from uvd.pipelines import render
from uvd import records as R
from uvd.records import Item, Reject, RejectError, Sentence
from uvd.registry import register_source
from uvd.source import (
    IMAGE_SUFFIXES, Source, UnitImages, check_unique_names, chunk_units, clash_rejects, files_by_stem, limit_items, resolve_inputs,
    split_chunk,
)

TASKS = ("depth", "normals", "edges")
ANNOTATION_SUFFIXES = (".png", ".npy")


@dataclass
class DenseOptions(P.PairingOptions):
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    depth_mode: str = "colormap"  # colormap (INFERNO, near bright) | grayscale
    edges_from: str = "file"  # file: edges/NAME.png|npy | canny: computed from the image
    canny_low: int = 100
    canny_high: int = 200
    images_per_unit: int = 1000  # a root is read (and paired) in units of this many images

    def validate(self, path: str) -> None:
        super().validate(path)
        P.check_tasks(f"{path}.tasks", self.tasks, TASKS)
        if self.depth_mode not in ("colormap", "grayscale"):
            raise ValueError(f"{path}.depth_mode: {self.depth_mode!r} is not one of colormap, grayscale")
        if self.edges_from not in ("file", "canny"):
            raise ValueError(f"{path}.edges_from: {self.edges_from!r} is not one of file, canny")
        if self.images_per_unit < 1:
            raise ValueError(f"{path}.images_per_unit: must be >= 1, got {self.images_per_unit}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"{path}.canny_low: must be in 0..canny_high, got {self.canny_low}")


@register_source
class DenseAnnotationsSource(P.PairsLabels, Source):
    name = "dense_annotations"
    Options = DenseOptions
    units_per_part = 1
    input_hint = "roots with images/ and depth|normals|edges/"

    def list_units(self) -> list[str]:
        roots = resolve_inputs(self.recipe.inputs)
        for root in roots:
            if not (root / "images").is_dir():
                raise ValueError(f"inputs: {root} has no images/ folder (layout: images/, depth/, normals/, edges/)")
        check_unique_names(roots, "input folders")
        size = self.options.images_per_unit
        return [u for r in roots for u in chunk_units(r, len(_images(r)), size)]

    def _folders(self, root: Path) -> dict[str, Path]:
        """Annotation folders present under `root`, per requested task (computed edges need none)."""
        return {
            task: root / task
            for task in self.options.tasks
            if (root / task).is_dir() and not (task == "edges" and self.options.edges_from == "canny")
        }

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._items(*split_chunk(unit)), max_items)

    def _items(self, root: Path, start: int) -> Iterator[Item]:
        folders = self._folders(root)
        found = {task: files_by_stem(folder, ANNOTATION_SUFFIXES, on_clash="reject") for task, folder in folders.items()}
        files = {task: by_stem for task, (by_stem, _) in found.items()}
        clashes = {task: clashing for task, (_, clashing) in found.items()}
        all_images = _images(root)
        images = all_images[start: start + self.options.images_per_unit]
        for path in images:
            key = f"{root.name}/images/{path.name}"
            data = path.read_bytes()
            yield P.input_item(key, data)
            image = P.decode_rgb(data, self.recipe.image.max_pixels)
            if image is None:
                continue  # the shared path rejects the image with its reason
            for task in self.options.tasks:
                if task == "edges" and self.options.edges_from == "canny":
                    yield P.annotation_item(key, task, render.canny_edges(image, self.options.canny_low, self.options.canny_high))
                    continue
                if task not in folders:
                    continue
                if path.stem in clashes[task]:
                    names = ", ".join(p.name for p in clashes[task][path.stem])
                    yield P.reject_item(P.annotation_key(key, task), R.FILE_CLASH, f"{task}/ has several files of its stem: {names}")
                    continue
                try:
                    rendered = self._render(task, files[task].get(path.stem), image.shape[:2])
                except RejectError as err:
                    yield P.reject_item(P.annotation_key(key, task), err.reason, err.detail)
                    continue
                yield P.annotation_item(key, task, rendered)
        if start:
            return  # annotations without an image are the first unit's rejects
        stems = {p.stem for p in all_images}
        for task, by_stem in files.items():
            for stem, path in sorted(by_stem.items()):
                if stem not in stems:
                    yield P.reject_item(f"{root.name}/{task}/{path.name}", P.MISSING_IMAGE, f"no images/{stem}.* for it")
            yield from clash_rejects({s: ps for s, ps in clashes[task].items() if s not in stems}, f"{root.name}/{task}")

    def _render(self, task: str, path: Path | None, shape: tuple[int, int]) -> np.ndarray:
        if path is None:
            raise RejectError(P.MISSING_ANNOTATION, f"no {task}/ file for this image")
        array = _load_array(path, rgb=task == "normals")
        if array.shape[:2] != shape:
            raise RejectError(render.MISMATCHED_ANNOTATION, f"{path.name} is {array.shape[:2]}, image is {shape}")
        if task == "depth":
            return render.render_depth(array, self.options.depth_mode)
        if task == "normals":
            return render.render_normals(array)
        return render.render_edges(array)

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        return self.pair(units, self.options.tasks)


def _images(root: Path) -> list[Path]:
    return sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)



def _load_array(path: Path, rgb: bool) -> np.ndarray:
    """A .npy array as stored, or a PNG at its bit depth (16-bit depth stays uint16; color as RGB)."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise ValueError("OpenCV cannot decode it")
            if array.ndim == 3:
                array = cv2.cvtColor(array[..., :3], cv2.COLOR_BGR2RGB)
                if not rgb:
                    array = array[..., 0]
    except (OSError, ValueError) as err:
        raise RejectError(render.BAD_ANNOTATION, f"{path.name}: {err}") from None
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise RejectError(render.BAD_ANNOTATION, f"{path.name}: dtype {array.dtype} is not numeric")
    return array
