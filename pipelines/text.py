"""Text in sentences: one id space, text ids offset above the visual and special ids.

A text segment is a run of BPE ids from the user's `tokenizer.json` (the `tokenizers` format,
e.g. GPT-2's; nothing downloads), stored in the same `tokens` column as id + TEXT_OFFSET
(8292 = 8192 visual ids + LVM's 100 special ids; GPT-2's 50257 ids end at 58549 < 65536, so
uint16 holds them). `meta.layout` lists the segments in order (`[["image", 256], ["text", 9], ...]`)
and `meta.text_tokenizer` names the tokenizer (sha256 of the file, vocab size, offset). Rows
without text (the LVM's pixel-only sentences) have neither and are unchanged.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uvd.records import Sentence, reason

TEXT_OFFSET = 8292  # visual ids 0..8191, special ids 8192..8291 (model/config.py VOCAB_SIZE)
MAX_ID = 65535  # the tokens column is list<uint16>

# Reject reasons of the in-context sources.
NO_CAPTION = reason("no_caption", "an image without a (non-empty) caption")
EMPTY_TEXT = reason("empty_text", "the text tokenizer made no ids of its text")
NO_PARTNER = reason("no_partner", "too few examples share its caption pool or class to fill an in-context sentence")


@dataclass
class TextOptions:
    """Sentence options shared by the in-context sources."""

    text_tokenizer: str = ""  # path of a tokenizer.json (the `tokenizers` library's format)
    text_tokenizer_sha256: str = ""  # filled from the file when the recipe loads; set it to pin the file
    examples: int = 3  # k in-context examples before the query (the sentence holds k + 1)
    max_text_tokens: int = 64  # a longer text is cut to this many ids (the sentence meta counts cuts)
    shuffle_units: int = 1  # examples are grouped across windows of this many consecutive units (1: within a unit)

    def validate(self, path: str) -> None:
        if not self.text_tokenizer:
            raise ValueError(f"{path}.text_tokenizer: give the path of a tokenizer.json (e.g. GPT-2's); nothing downloads")
        if not 1 <= self.examples <= 15:
            raise ValueError(f"{path}.examples: between 1 and 15 (sentences hold at most 16 images), got {self.examples}")
        if self.max_text_tokens < 1:
            raise ValueError(f"{path}.max_text_tokens: must be >= 1, got {self.max_text_tokens}")
        if self.shuffle_units < 1:
            raise ValueError(f"{path}.shuffle_units: must be >= 1, got {self.shuffle_units}")


def check_text_tokenizer(options: TextOptions, path: str = "sentence") -> None:
    """At recipe load: record the file's sha256 (so the recipe hash follows the file's content),
    or check it against a pinned one. A file that is not there yet is checked when the run starts."""
    file = Path(options.text_tokenizer).expanduser()
    if not file.is_file():
        return
    digest = file_sha256(str(file))
    if options.text_tokenizer_sha256 and options.text_tokenizer_sha256 != digest:
        raise ValueError(f"{path}.text_tokenizer_sha256: {options.text_tokenizer} has sha256 {digest}, "
                         f"not the pinned {options.text_tokenizer_sha256}")
    options.text_tokenizer_sha256 = digest
    load_text_tokenizer(str(file), digest)  # a bad file is the user's mistake: say so at load


def require_text_tokenizer(options: TextOptions, path: str = "sentence") -> "TextTokenizer":
    """At run time (driver and Ray tasks): the tokenizer, which must still be the file the recipe named."""
    file = Path(options.text_tokenizer).expanduser()
    if not file.is_file():
        raise ValueError(f"{path}.text_tokenizer: {options.text_tokenizer} does not exist")
    digest = file_sha256(str(file))
    if options.text_tokenizer_sha256 and digest != options.text_tokenizer_sha256:
        raise ValueError(f"{path}.text_tokenizer: {options.text_tokenizer} changed since the recipe was loaded "
                         f"(sha256 {digest}, recipe {options.text_tokenizer_sha256})")
    return load_text_tokenizer(str(file), digest)


@functools.lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TextTokenizer:
    """A `tokenizers` tokenizer.json; `encode` gives ids already offset into UVD's id space."""

    def __init__(self, path: str, sha256: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the library raises its own exception type for a bad file
            raise ValueError(f"sentence.text_tokenizer: {path} is not a tokenizers tokenizer.json ({err})") from None
        self.sha256 = sha256
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if TEXT_OFFSET + self.vocab_size - 1 > MAX_ID:
            raise ValueError(f"sentence.text_tokenizer: a vocabulary of {self.vocab_size} ids does not fit uint16 above "
                             f"offset {TEXT_OFFSET} (at most {MAX_ID - TEXT_OFFSET + 1} ids)")

    def encode(self, text: str) -> np.ndarray:
        """(n,) uint16 ids + TEXT_OFFSET, without special tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return (np.asarray(ids, dtype=np.int64) + TEXT_OFFSET).astype(np.uint16)

    def identity(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "offset": TEXT_OFFSET}


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(path: str, sha256: str) -> TextTokenizer:
    return TextTokenizer(path, sha256)


@dataclass
class TextSentence(Sentence):
    """A sentence of image and text segments: `segments` holds ("image", index into `images`) or
    ("text", (n,) uint16 offset ids), in order. Its row's tokens follow that order and its meta
    gets `layout`; `images`, `num_images` and the id are as for any sentence."""

    segments: list[tuple[str, Any]] = field(default_factory=list)

    def to_row(self, source: str) -> dict[str, Any]:
        row = super().to_row(source)
        parts, layout = [], []
        for kind, value in self.segments:
            ids = self.images[value].tokens if kind == "image" else value
            parts.append(np.asarray(ids, dtype=np.uint16))
            layout.append([kind, int(len(ids))])
        assert sorted(v for k, v in self.segments if k == "image") == list(range(len(self.images)))
        row["tokens"] = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
        meta = json.loads(row["meta"])
        meta["layout"] = layout
        row["meta"] = json.dumps(meta, sort_keys=True)
        return row


def split_layout(tokens: np.ndarray, layout: list[list]) -> list[tuple[str, np.ndarray]]:
    """A row's tokens cut along its `meta.layout` -> [(kind, ids)]; ValueError when they disagree."""
    if sum(n for _, n in layout) != len(tokens):
        raise ValueError(f"meta.layout: covers {sum(n for _, n in layout)} tokens, the row has {len(tokens)}")
    out, start = [], 0
    for kind, n in layout:
        out.append((kind, tokens[start : start + n]))
        start += n
    return out


def cut_text(ids: np.ndarray, limit: int) -> tuple[np.ndarray, bool]:
    return (ids[:limit], True) if len(ids) > limit else (ids, False)
