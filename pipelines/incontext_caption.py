"""`incontext_caption`: in-context captioning sentences from LAION (img2dataset) shards with captions.

    uvd run recipes/incontext_caption.yaml --set inputs=/data/laion \
        --set sentence.text_tokenizer=/models/gpt2/tokenizer.json --out out/incontext_caption

A sentence is k (image, caption) examples and a query image with its caption:
`{x1, c1, ..., xk, ck, xq, cq}`, images as 256 VQGAN ids, captions as text ids (pipelines/text.py).
Reading is the `laion` source's (every sample accounted for; the caption is the `.txt` member or
the status table's `caption`); the unit's captioned images are shuffled with the unit's RNG and cut
into groups of k + 1. Images without a caption are rejected (`no_caption`), as are the left-over
ones (`unused_remainder`, or `no_partner` when the unit holds fewer than k + 1 captioned images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from pipelines import text as T
from pipelines.laion import LaionOptions, LaionSource
from uvd import records as R
from uvd.records import Reject, Sentence
from uvd.registry import register_source
from uvd.source import UnitImages

TASK = "incontext_caption"


@dataclass
class IncontextCaptionOptions(LaionOptions, T.TextOptions):
    def validate(self, path: str) -> None:
        LaionOptions.validate(self, path)
        T.TextOptions.validate(self, path)
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
        return super().list_units()

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        tokenizer = T.require_text_tokenizer(self.options)
        group = self.options.examples + 1
        for unit in units:
            examples = []  # (image, caption ids, was cut)
            for image in unit.images:
                caption = image.meta.get("caption")
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
                        "captions_cut": sum(cut for _, _, cut in chosen),
                        "urls": [image.meta.get("url") for image, _, _ in chosen]}
                yield T.TextSentence(TASK, [image for image, _, _ in chosen], meta=meta, segments=segments)
            reason = R.UNUSED_REMAINDER if num_full else T.NO_PARTNER
            for image, _, _ in examples[num_full:]:
                detail = f"{len(examples)} captioned images in the unit; sentences take {group}"
                yield Reject(image.key, reason, detail, unit.unit)
