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

# Reject reasons: short, stable codes (counted in stats and the audit), each registered once with
# its one-line meaning. A pipeline registers its own codes the same way, in its own module; the
# README's reject-reason table is generated from REASONS (`python -m uvd.records README.md`).
REASONS: dict[str, str] = {}


def reason(code: str, meaning: str) -> str:
    """Register reject reason `code` with its one-line meaning -> the code (for a module constant).
    Registering a code again with another meaning is a mistake: one code, one meaning."""
    if not code or code != code.strip().lower() or " " in code:
        raise ValueError(f"reject reason {code!r}: codes are short lower_case words")
    known = REASONS.setdefault(code, meaning)
    if known != meaning:
        raise ValueError(f"reject reason {code!r} registered twice with different meanings: {known!r} and {meaning!r}")
    return code


def reason_meaning(code: str) -> str:
    """The registered meaning of `code`; a code not yet registered loads the source plug-ins (which
    register theirs when imported) first; "" for a code nothing registers (e.g. an older run's)."""
    if code not in REASONS:
        from uvd.registry import load_plugins

        try:
            load_plugins("sources")
        except ImportError:  # a plug-in that cannot be imported here: its codes stay unexplained
            pass
    return REASONS.get(code, "")


README_BEGIN, README_END = "<!-- reject-reasons:begin -->", "<!-- reject-reasons:end -->"


def reasons_table() -> str:
    """The README's reject-reason table (Markdown), from every registered code."""
    from uvd.registry import load_plugins

    load_plugins("sources")
    rows = [f"| `{code}` | {meaning} |" for code, meaning in sorted(REASONS.items())]
    return "\n".join(["| reason | meaning |", "| --- | --- |", *rows])


def write_reasons_table(readme: str) -> str:
    """`readme` with the text between the reject-reason markers replaced by `reasons_table()`."""
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"README: the markers {README_BEGIN} ... {README_END} are missing")
    return f"{head}{README_BEGIN}\n{reasons_table()}\n{README_END}{tail}"


class RejectError(Exception):
    """A bad input, raised where it is found and turned into a `Reject` (or a rejected `Item`)
    by whoever reads the input: `reason` is a registered code, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


DOWNLOAD_FAILED = reason("download_failed", "the downloader recorded a failure for it (img2dataset's failed_to_download, failed_to_resize)")
EMPTY_FILE = reason("empty_file", "a file (or tar member) of zero bytes")
NOT_AN_IMAGE = reason("not_an_image", "no image format is recognised in the data")
TRUNCATED_IMAGE = reason("truncated_image", "the data ends early, even inside the header")
CORRUPT_IMAGE = reason("corrupt_image", "the decoder cannot read it (broken header or stream, impossible size)")
DECOMPRESSION_BOMB = reason("decompression_bomb", "its header's size is over image.max_pixels (refused before decoding)")
UNSUPPORTED_MODE = reason("unsupported_mode", "it decodes to a pixel mode we do not convert (e.g. HSV, La)")
TOO_SMALL = reason("too_small", "its shorter side is below filters.min_side")
BAD_ASPECT = reason("bad_aspect", "its long/short side ratio is above filters.max_aspect")
TOO_LARGE = reason("too_large", "a file or tar member over limits.max_member_bytes / max_file_bytes, refused unread")
DUPLICATE = reason("duplicate", "the same bytes as an input kept earlier (exact duplicate)")
DUPLICATE_KEY = reason("duplicate_key", "its key (or a sentence's keys) was already read in its unit; the first occurrence wins")
FILE_CLASH = reason("file_clash", "several files of one folder share its stem (e.g. a.jpg and a.png); none is used")
UNREADABLE = reason("unreadable", "a whole input unit (e.g. a cut tar) cannot be read, and the items of it not reached")
MISSING_IMAGE = reason("missing_image", "an annotation, sample or status row whose image is absent")
INCOMPLETE_WINDOW = reason("incomplete_window", "a frame or view whose windows all lost another member (e.g. to a filter)")
UNUSED_REMAINDER = reason("unused_remainder", "images no group or sentence had room for")

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


if __name__ == "__main__":  # python -m uvd.records [README.md]: print the table, or rewrite it in the README
    import sys
    from pathlib import Path

    from uvd import records  # the module the plug-ins register into (this one runs as __main__)

    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
        path.write_text(records.write_reasons_table(path.read_text()))
    else:
        print(records.reasons_table())
