"""`incontext_caption`: in-context captioning sentences from LAION shards or COCO captions.

    uvd run recipes/incontext_caption.yaml --set inputs=/data/laion \
        --set sentence.text_tokenizer=/models/gpt2/tokenizer.json --out out/incontext_caption
    uvd run recipes/incontext_caption.yaml --set inputs=/data/coco --set sentence.captions_from=coco ...

A sentence is k (image, caption) examples and a query image with its caption:
`{x1, c1, ..., xk, ck, xq, cq}`, images as 256 VQGAN ids, captions as text ids (pipelines/text.py).
With `captions_from: laion` reading is the `laion` source's (every sample accounted for; the caption
is the `.txt` member or the status table's `caption`); with `coco`, `annotations/captions_<split>.json`
and images in `<split>/`, units of `images_per_unit` images, one of each image's captions drawn with
the unit's RNG. The unit's captioned images are shuffled with the unit's RNG and cut
into groups of k + 1. Images without a caption are rejected (`no_caption`), as are the left-over
ones (`unused_remainder`, or `no_partner` when the unit holds fewer than k + 1 captioned images).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from uvd.pipelines import pairing as P
from uvd.pipelines import text as T
from uvd.pipelines.coco import split_unit_items, split_units
from uvd.pipelines.laion import LaionOptions, LaionSource
from uvd import records as R
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import UnitImages, limit_items

TASK = "incontext_caption"


@dataclass
class IncontextCaptionOptions(LaionOptions, T.TextOptions):
    captions_from: str = "laion"  # laion: img2dataset shards | coco: annotations/captions_<split>.json
    images_per_unit: int = 1000  # coco: image files per unit; sentences are made within a unit

    def validate(self, path: str) -> None:
        LaionOptions.validate(self, path)
        T.TextOptions.validate(self, path)
        if self.captions_from not in ("laion", "coco"):
            raise ValueError(f"{path}.captions_from: {self.captions_from!r} is not one of laion, coco")
        if self.images_per_unit < 1:
            raise ValueError(f"{path}.images_per_unit: must be >= 1, got {self.images_per_unit}")
        if not self.keep_caption:
            raise ValueError(f"{path}.keep_caption: must be true (the captions are the sentence's text)")


@register_source
class IncontextCaptionSource(LaionSource):
    name = "incontext_caption"
    Options = IncontextCaptionOptions

    @classmethod
    def check_recipe(cls, recipe) -> None:
        T.check_text_tokenizer(recipe.sentence)

    def list_units(self) -> list[str]:
        T.require_text_tokenizer(self.options)
        if self.options.captions_from == "laion":
            return super().list_units()
        return split_units(self.recipe.inputs, "captions", self.options.images_per_unit)

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        if self.options.captions_from == "laion":
            yield from super().read_unit(unit, max_items)
            return
        items = split_unit_items(unit, self.options.images_per_unit, "captions", _load_captions,
                                 self._captioned_item, "captions file")
        yield from limit_items(items, max_items)

    def _captioned_item(self, folder: Path, key: str, entry: dict, coco: _Captions) -> Iterator[Item]:
        captions = coco.captions.get(entry["id"])
        if not captions:
            yield P.reject_item(key, T.NO_CAPTION, f"image id {entry['id']} has no caption")
        else:
            yield Item(key, data=(folder / entry["file_name"]).read_bytes(), meta={"captions": captions})

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        tokenizer = T.require_text_tokenizer(self.options)
        group = self.options.examples + 1
        for unit in units:
            examples = []  # (image, caption ids, was cut)
            for image in unit.images:
                caption = image.meta.get("caption")
                if "captions" in image.meta:  # COCO: one of the image's captions (about 5), per unit RNG
                    caption = self.rng.choice(image.meta["captions"])
                if not isinstance(caption, str) or not caption.strip():
                    yield Reject(image.key, T.NO_CAPTION, "no .txt member or caption field", unit.unit)
                    continue
                ids, cut = T.cut_text(tokenizer.encode(caption.strip()), self.options.max_text_tokens)
                if len(ids) == 0:
                    yield Reject(image.key, T.EMPTY_TEXT, f"the text tokenizer makes no ids of {caption[:80]!r}", unit.unit)
                    continue
                examples.append((image, ids, cut))
            self.rng.shuffle(examples)
            num_full = len(examples) // group * group
            for start in range(0, num_full, group):
                chosen = examples[start : start + group]
                segments: list[tuple[str, object]] = []
                for i, (_, ids, _) in enumerate(chosen):
                    segments += [("image", i), ("text", ids)]
                meta = {"examples": self.options.examples, "text_tokenizer": tokenizer.identity(),
                        "captions_cut": sum(cut for _, _, cut in chosen)}
                if self.options.captions_from == "laion":
                    meta["urls"] = [image.meta.get("url") for image, _, _ in chosen]
                yield T.TextSentence(TASK, [image for image, _, _ in chosen], meta=meta, segments=segments)
            reason = R.UNUSED_REMAINDER if num_full else T.NO_PARTNER
            for image, _, _ in examples[num_full:]:
                detail = f"{len(examples)} captioned images in the unit; sentences take {group}"
                yield Reject(image.key, reason, detail, unit.unit)


@dataclass
class _Captions:
    by_name: dict[str, dict]  # file name -> image entry
    captions: dict  # image id -> its captions, in file order
    orphans: list  # (annotation id, image id) of captions whose image is not in the file


@functools.lru_cache(maxsize=2)
def _load_captions(path: str, mtime_ns: int) -> _Captions:
    """Parse and index one COCO captions file (cached per process, as the other COCO readers)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError("expected an object with lists images and annotations")
    if not all(isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str) for im in data["images"]):
        raise ValueError("an image entry without id or file_name")
    captions: dict = {im["id"]: [] for im in data["images"]}
    orphans = []
    for ann in (a for a in data["annotations"] if isinstance(a, dict)):  # file order
        text = ann.get("caption")
        if ann.get("image_id") not in captions:
            orphans.append((ann.get("id"), ann.get("image_id")))
        elif isinstance(text, str) and text.strip():
            captions[ann["image_id"]].append(text.strip())
    return _Captions({im["file_name"]: im for im in data["images"]}, captions, orphans)
