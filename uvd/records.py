"""The records that flow through every UVD job.

A source reads `Item`s (one input image each), the shared path turns each into an
`ImageRecord` (tokens) or a `Reject`, and the source assembles records into
`Sentence`s, which become one Parquet row each.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Reject reasons: short, stable codes (counted in stats and the audit).
DOWNLOAD_FAILED = "download_failed"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
DUPLICATE = "duplicate"
UNREADABLE = "unreadable"
UNUSED_REMAINDER = "unused_remainder"

TOKENS_PER_IMAGE = 256


@dataclass
class Item:
    """One input image as a source's reader yields it: encoded bytes or decoded RGB pixels."""

    key: str  # provenance, unique within a run (e.g. "00000.tar/000000012")
    data: bytes = b""  # the encoded file (JPEG, PNG, ...)
    array: np.ndarray | None = None  # or already decoded pixels, (H, W, 3) uint8
    meta: dict[str, Any] = field(default_factory=dict)
    reject: str = ""  # set when the reader already knows the item is bad
    detail: str = ""


@dataclass
class ImageRecord:
    """One tokenized image."""

    key: str
    tokens: np.ndarray  # (256,) uint16
    content_hash: str  # sha256 of the input bytes (or pixels), for exact-duplicate removal
    width: int  # size before preprocessing
    height: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reject:
    """An input that did not make it into any sentence, and why."""

    key: str
    reason: str
    detail: str = ""
    unit: str = ""


@dataclass
class Sentence:
    """A visual sentence: 1-16 tokenized images in order, plus what the source knows about it."""

    task: str
    images: list[ImageRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    def sentence_id(self, source: str) -> str:
        """Stable id: the same source, task and input keys always give the same id."""
        text = "\x1f".join([source, self.task, *(im.key for im in self.images)])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def to_row(self, source: str) -> dict[str, Any]:
        tokens = np.concatenate([im.tokens for im in self.images]).astype(np.uint16)
        meta = dict(self.meta)
        meta["image_sizes"] = [[im.width, im.height] for im in self.images]
        return {
            "id": self.sentence_id(source),
            "source": source,
            "task": self.task,
            "num_images": len(self.images),
            "tokens": tokens,
            "images": [im.key for im in self.images],
            "meta": json.dumps(meta, sort_keys=True),
        }
