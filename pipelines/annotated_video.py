"""`annotated_video`: video frames with per-frame annotations (VIPSeg / JHMDB style), as
interleaved {f1, a1, f2, a2, ...} and grouped {f1, f2, ..., a1, a2, ...} sentences of up to
16 images (tasks `<annotation>_interleaved`, `<annotation>_grouped`).

    uvd run recipes/annotated_video.yaml --set inputs=/data/vipseg_clips --out out/annotated_video

One unit per clip folder `<clip>/frames/NAME.jpg` with `<clip>/<annotation folder>/NAME.png`
per annotation type (`sentence.annotations`). `segmentation` label maps (8/16-bit class ids)
are rendered with the shared palette (pipelines/render.py); other types are read as images.
Each frame and annotation is tokenized once and used by every layout.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvd.pipelines import pairing as P
from uvd.pipelines.render import BAD_ANNOTATION, MISMATCHED_ANNOTATION, render_segmentation
from uvd import records as R
from uvd.records import Item, Reject, RejectError, Sentence
from uvd.registry import register_source
from uvd.source import IMAGE_SUFFIXES, Source, UnitImages, clash_rejects, files_by_stem, limit_items, resolve_inputs

LAYOUTS = ("interleaved", "grouped")
LABEL_MAP_TASKS = ("segmentation",)  # annotation types stored as class ids, rendered with the palette
FRAME = "frame"


@dataclass
class AnnotatedVideoOptions:
    annotations: dict[str, str] = field(default_factory=lambda: {"segmentation": "masks"})  # type -> folder in each clip
    frames_dir: str = "frames"
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    frames_per_sentence: int = 8  # (frame, annotation) pairs per sentence: 8 -> 16 images
    frame_stride: int = 1  # use every n-th frame file of a clip
    min_frames: int = 2  # a clip's last, shorter window is kept when it has at least this many pairs

    def validate(self, path: str) -> None:
        if not self.annotations:
            raise ValueError(f"{path}.annotations: name at least one annotation type and its folder, e.g. {{segmentation: masks}}")
        for task, folder in self.annotations.items():
            if not task.isidentifier() or not folder or folder == self.frames_dir:
                raise ValueError(f"{path}.annotations.{task}: needs a plain name and its own folder, got {folder!r}")
        P.check_tasks(f"{path}.layouts", self.layouts, LAYOUTS)
        if not 1 <= self.frames_per_sentence <= 8:
            raise ValueError(f"{path}.frames_per_sentence: must be in 1..8 (2 images each, 16 at most), got {self.frames_per_sentence}")
        if self.frame_stride < 1:
            raise ValueError(f"{path}.frame_stride: must be >= 1, got {self.frame_stride}")
        if not 1 <= self.min_frames <= self.frames_per_sentence:
            raise ValueError(f"{path}.min_frames: must be in 1..frames_per_sentence, got {self.min_frames}")


def layout_images(frames: list, annotations: list, layout: str) -> list:
    """interleaved: f1, a1, f2, a2, ...; grouped: f1, f2, ..., a1, a2, ..."""
    if layout == "interleaved":
        return [x for pair in zip(frames, annotations) for x in pair]
    return [*frames, *annotations]


@register_source
class AnnotatedVideoSource(Source):
    name = "annotated_video"
    Options = AnnotatedVideoOptions
    units_per_part = 8
    input_hint = "clip folders <clip>/frames/"

    def list_units(self) -> list[str]:
        clips = []
        for root in resolve_inputs(self.recipe.inputs):
            if (root / self.options.frames_dir).is_dir():
                clips.append(root)
            elif root.is_dir():
                clips.extend(d for d in sorted(root.iterdir()) if (d / self.options.frames_dir).is_dir())
        names = [c.name for c in clips]
        if len(set(names)) != len(names):
            raise ValueError("inputs: the same clip folder name appears under several roots")
        return [str(c) for c in clips]

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._items(Path(unit)), max_items)

    def _items(self, clip: Path) -> Iterator[Item]:
        o = self.options
        frames, frame_clashes = files_by_stem(clip / o.frames_dir, IMAGE_SUFFIXES, on_clash="reject")
        yield from clash_rejects(frame_clashes, f"{clip.name}/{o.frames_dir}")
        stems = sorted(frames)[:: o.frame_stride]
        annotations: dict[str, dict[str, Path]] = {}
        for task, folder in o.annotations.items():
            annotations[task], clashes = files_by_stem(clip / folder, None, on_clash="reject")
            for stem, paths in sorted(clashes.items()):
                for path in paths:
                    key = P.annotation_key(f"{clip.name}/{folder}/{path.name}", task)
                    yield Item(key, reject=R.FILE_CLASH, detail=f"{folder}/ has several files of stem {stem!r}")
        for position, stem in enumerate(stems):
            frame_key = f"{clip.name}/{o.frames_dir}/{frames[stem].name}"
            present = [t for t in o.annotations if stem in annotations[t]]
            if not present:
                yield Item(frame_key, reject=P.MISSING_ANNOTATION, detail=f"no {'/'.join(o.annotations.values())} file for {stem}")
                continue
            data = frames[stem].read_bytes()
            meta = {"clip": clip.name, "frame": position, "stem": stem}
            yield Item(frame_key, data=data, meta={**meta, "pair": frame_key, "role": FRAME})
            for task in present:
                path = annotations[task][stem]
                key = P.annotation_key(f"{clip.name}/{o.annotations[task]}/{path.name}", task)
                try:
                    array = self._render(task, path, data)
                except RejectError as err:
                    yield Item(key, reject=err.reason, detail=err.detail)
                    continue
                yield Item(key, array=array, meta={**meta, "pair": frame_key, "role": task})
        for task, files in annotations.items():
            for stem in sorted(set(files) - set(frames)):
                key = P.annotation_key(f"{clip.name}/{o.annotations[task]}/{files[stem].name}", task)
                if stem in frame_clashes:
                    yield Item(key, reject=R.FILE_CLASH, detail=f"its frame {stem} is ambiguous: several files in {o.frames_dir}/")
                else:
                    yield Item(key, reject=P.MISSING_IMAGE, detail=f"no frame {stem} in {o.frames_dir}/")

    def _render(self, task: str, path: Path, frame: bytes) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img.load()
                annotation = img.copy()
            with Image.open(io.BytesIO(frame)) as f:
                frame_size = f.size
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise RejectError(BAD_ANNOTATION, f"{path.name}: {str(err)[:200]}") from None
        if annotation.size != frame_size:
            raise RejectError(MISMATCHED_ANNOTATION, f"{path.name} is {annotation.size}, its frame {frame_size}")
        if task in LABEL_MAP_TASKS:
            if annotation.mode not in ("L", "P", "I", "I;16"):
                raise RejectError(BAD_ANNOTATION, f"{path.name}: label map must be single-channel class ids, got mode {annotation.mode}")
            labels = P.fit_nearest(np.asarray(annotation).astype(np.int32), self.recipe.image)
            return render_segmentation(labels)
        return np.asarray(annotation.convert("RGB"), dtype=np.uint8)

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        o = self.options
        for unit in units:
            frames = {im.key: im for im in unit.images if im.meta["role"] == FRAME}
            used: set[str] = set()
            leftover: set[str] = set()
            for task in o.annotations:
                pairs = sorted(
                    ((frames[im.meta["pair"]], im) for im in unit.images
                     if im.meta["role"] == task and im.meta["pair"] in frames),
                    key=lambda pair: pair[0].meta["frame"],
                )
                n = o.frames_per_sentence
                for start in range(0, len(pairs), n):
                    window = pairs[start : start + n]
                    if len(window) < o.min_frames:
                        leftover.update(im.key for pair in window for im in pair)
                        continue
                    f, a = [p[0] for p in window], [p[1] for p in window]
                    used.update(im.key for im in f + a)
                    for layout in o.layouts:
                        meta = {"clip": f[0].meta["clip"], "annotation": task, "layout": layout,
                                "frames": [im.meta["frame"] for im in f], "window": start // n}
                        yield Sentence(f"{task}_{layout}", layout_images(f, a, layout), meta=meta)
            for image in unit.images:
                if image.key in used:
                    continue
                if image.key in leftover:
                    yield Reject(image.key, R.UNUSED_REMAINDER, f"fewer than sentence.min_frames={o.min_frames} pairs left in the clip", unit.unit)
                else:
                    yield Reject(image.key, P.UNPAIRED, "its frame or every annotation of it was rejected", unit.unit)


def count_images(sentences: list[Sentence]) -> dict[str, int]:
    """Distinct tokenized images vs image uses: both layouts share every image."""
    return {"distinct": len({im.key for s in sentences for im in s.images}), "uses": sum(len(s.images) for s in sentences)}
