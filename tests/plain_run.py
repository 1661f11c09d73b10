"""A source's read_unit + the shared preprocessing + assembly on plain lists: the production
pipeline's functions without Ray and without the tokenizer (tokens are zeros; pixels are kept by key)."""
from __future__ import annotations

import numpy as np

from uvd.assemble import assemble_units
from uvd.records import ImageRecord, Reject, RejectError, Sentence
from uvd.registry import get_source
from uvd.source import UnitImages
from uvd.work import preprocess_item


def run_plain(recipe):
    """-> (sentences, rejects (reading and assembling), items read, {key: (256, 256, 3) pixels})."""
    source = get_source(recipe.source)(recipe)
    units, rejects, items, pixels = [], [], [], {}
    for unit in source.list_units():
        images = []
        for item in source.read_unit(unit):
            items.append(item)
            if item.reject:
                rejects.append(Reject(item.key, item.reject, item.detail, unit))
                continue
            try:
                px, w, h, digest = preprocess_item(item, recipe.image, recipe.filters)
            except RejectError as err:
                rejects.append(Reject(item.key, err.reason, err.detail, unit))
                continue
            pixels[item.key] = px
            images.append(ImageRecord(item.key, np.zeros(256, np.uint16), digest.hex(), w, h, item.meta))
        units.append(UnitImages(unit, images))
    out = list(assemble_units(source, units))
    sentences = [o for o in out if isinstance(o, Sentence)]
    return sentences, rejects + [o for o in out if isinstance(o, Reject)], items, pixels
