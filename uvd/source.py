"""The interface every source in `pipelines/` implements: enumerate, read, assemble.

`list_units` runs on the driver (names only: a tar shard, a class folder, a video, a chunk of
a dataset's images); `read_unit` and `assemble` run inside Ray tasks. Most sources assemble
each unit on its own (`assembly = "unit"`: `assemble` gets one unit's tokenized images, with
`self.rng` seeded from the recipe seed and the unit's name). A source whose sentences span
units (`assembly = "global"`) instead implements `plan` (one task, from per-unit counts only,
writes a plan under the run's `_uvd/plan/`) and `materialize` (per part, from that plan).
Decode, resize, tokenize and write are shared and live elsewhere; what sources share for reading
lives here too: `limit_items`, `IMAGE_SUFFIXES`, `files_by_stem`, `file_size_reject`, `chunk_units`/`split_chunk`.
"""
from __future__ import annotations

import glob
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator, Literal, TypeVar

from uvd.records import EMPTY_FILE, FILE_CLASH, INCOMPLETE_WINDOW, TOO_LARGE, ImageRecord, Item, Reject, Sentence
from uvd.storage import is_uri

if TYPE_CHECKING:
    from uvd.recipe import Recipe


@dataclass
class NoOptions:
    """For sources without sentence-layout options."""


@dataclass
class UnitImages:
    """What the shared path made of one unit: its tokenized images, in reading order."""

    unit: str
    images: list[ImageRecord]


class Source:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    assembly: ClassVar[str] = "unit"  # "unit": sentences never span units; "global": plan + materialize
    units_per_part: ClassVar[int] = 1  # default units per part (recipe: output.units_per_part)
    input_hint: ClassVar[str] = "input files"  # what list_units looks for, for the "no input" message

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.options = recipe.sentence
        self.rng = random.Random(recipe.seed)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Cross-field checks a source needs beyond its Options' own validation."""

    def list_units(self) -> list[str]:
        """The units of input, in a deterministic order."""
        raise NotImplementedError

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        """Yield the unit's items (at most `max_items`), bad ones with `reject` set."""
        raise NotImplementedError

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        """Turn tokenized images into sentences; every image not used is yielded as a Reject."""
        raise NotImplementedError

    def looks_for(self) -> str:
        return f"{self.input_hint} under {', '.join(self.recipe.inputs)}"

    @property
    def assembly_window(self) -> int:
        """Consecutive units assembled together (unit-local sources): `sentence.shuffle_units` where
        the source has it, so pairs and groups are shuffled across that many units (windows are cut
        from the unit list, never from parts or nodes); 1: each unit on its own."""
        return max(1, int(getattr(self.options, "shuffle_units", 1) or 1))

    # Sources with assembly = "global" implement these two instead of `assemble`.
    def plan(self, run_dir: Path, parts: list[dict]) -> None:
        """From each part's units and their kept image counts, write the plan (under _uvd/plan/)."""
        raise NotImplementedError

    def materialize(self, part, images: list[UnitImages], run_dir: Path) -> Iterator[Sentence | Reject]:
        """The sentences the plan gives this part, and the rejects of its own units."""
        raise NotImplementedError


def resolve_inputs(inputs: list[str], field: str = "inputs") -> list[Path]:
    """Expand paths and globs; a pattern or path that matches nothing is the user's mistake."""
    paths: list[Path] = []
    for pattern in inputs:
        if is_uri(pattern):
            raise ValueError(f"{field}: {pattern!r}: this source reads local files only (object-store inputs are read "
                             "by laion and incontext_caption); copy the inputs to a local or mounted folder")
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if Path(m).exists()]
        if not matches:
            raise ValueError(f"{field}: {pattern!r} matches nothing on disk")
        paths.extend(Path(m).resolve() for m in matches)
    return paths


def find_input_files(inputs: list[str], suffixes: Iterable[str], what: str = "files") -> dict[Path, str]:
    """Files under the inputs (folders searched recursively) with one of `suffixes`, mapped to the
    name used in their keys: the path relative to its input folder (or the file name)."""
    wanted = {"." + s.lower().lstrip(".") for s in suffixes}
    names: dict[Path, str] = {}
    for root in resolve_inputs(inputs):
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted):
                names[path] = path.relative_to(root).as_posix()
        else:
            names[root] = root.name
    if len(set(names.values())) != len(names):
        raise ValueError(f"inputs: two {what} would get the same key (same relative path under several inputs)")
    return names


def check_unique_names(units: Iterable[str | Path], what: str) -> None:
    """Keys start with a unit's name, so two units of the same name would give clashing keys."""
    names = [Path(u).name for u in units]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"inputs: several {what} are named {clash[0]!r}; keys would not be unique")


def chunk_units(root: Path, count: int, size: int) -> list[str]:
    """Units of at most `size` items of a folder holding `count` (at least one unit, so a
    folder's own rejects always have a unit): `<root>::<start>`."""
    return [f"{root}::{start}" for start in range(0, max(count, 1), size)]


def split_chunk(unit: str) -> tuple[Path, int]:
    """`<root>::<start>` -> (root, start)."""
    root, _, start = unit.rpartition("::")
    return Path(root), int(start)


# The image files every folder-reading source reads, in the order a webdataset sample's image
# member is chosen (pipelines/laion_shards.py). All decode through uvd/images.py.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def file_size_reject(path: Path, key: str, max_file_bytes: int) -> Item | None:
    """The reject of a whole input file refused before any decoder sees it (empty, or over
    limits.max_file_bytes), else None."""
    size = path.stat().st_size
    if size == 0:
        return Item(key, reject=EMPTY_FILE, detail="zero bytes")
    if size > max_file_bytes:
        return Item(key, reject=TOO_LARGE, detail=f"{size} bytes over limits.max_file_bytes={max_file_bytes}")
    return None


def limit_items(items: Iterable[Item], max_items: int | None) -> Iterator[Item]:
    """The first `max_items` of a reader's items (all of them with None). The reader is closed after
    the last one taken, so it reads (and decodes, downloads, renders) nothing further."""
    iterator = iter(items)
    try:
        if max_items is None:
            yield from iterator
            return
        for _ in range(max_items):
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def input_file_unit(unit: str, names: dict[Path, str], max_file_bytes: int) -> tuple[Path, str, Item | None]:
    """A unit that is one input file (video, mesh), `names` being `find_input_files`' mapping ->
    (its path, the name its keys start with, its `file_size_reject` or None)."""
    path = Path(unit)
    name = names.get(path, path.name)
    return path, name, file_size_reject(path, name, max_file_bytes)


W = TypeVar("W")


def assemble_windows(unit: UnitImages, windows: Iterable[tuple[W, list[str]]],
                     make_sentence: Callable[[W, list[ImageRecord]], Sentence], detail: str) -> Iterator[Sentence | Reject]:
    """One unit's sentences of fixed windows (a video's frames per stride, an object's views):
    `windows` are (label, image keys); for each window whose images were all tokenized, in the
    given order, `make_sentence(label, its images in the window's order)`. Windows may overlap.
    Then every image of the unit no emitted window used, in the unit's order, is a Reject
    (`incomplete_window`, `detail`): each window it was in lost another image."""
    by_key = {image.key: image for image in unit.images}
    used: set[str] = set()
    for label, keys in windows:
        if all(k in by_key for k in keys):
            used.update(keys)
            yield make_sentence(label, [by_key[k] for k in keys])
    for image in unit.images:
        if image.key not in used:
            yield Reject(image.key, INCOMPLETE_WINDOW, detail, unit.unit)


def files_by_stem(folder: Path, suffixes: Iterable[str] | None = IMAGE_SUFFIXES,
                  on_clash: Literal["error", "reject"] = "reject") -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The files of `folder` (not recursive; a missing folder has none) with one of `suffixes` (any
    suffix with None), by stem -> ({stem: file}, {stem: clashing files}). Several files of one stem
    (`a.jpg`, `a.png`) are never resolved by keeping one: with on_clash="error" they raise ValueError
    (the user's folder is ambiguous: for checks on the driver), with "reject" they are left out of
    the first mapping and returned in the second, for the caller to reject each (`clash_rejects`)."""
    if on_clash not in ("error", "reject"):
        raise ValueError(f"on_clash: {on_clash!r} is not 'error' or 'reject'")
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    grouped: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and (wanted is None or path.suffix.lower() in wanted):
                grouped.setdefault(path.stem, []).append(path)
    clashes = {stem: paths for stem, paths in grouped.items() if len(paths) > 1}
    if clashes and on_clash == "error":
        stem, paths = next(iter(clashes.items()))
        raise ValueError(f"{folder}: {' and '.join(p.name for p in paths)} have the same name; pairs would be ambiguous")
    return {stem: paths[0] for stem, paths in grouped.items() if len(paths) == 1}, clashes


def clash_rejects(clashes: dict[str, list[Path]], key_prefix: str) -> Iterator[Item]:
    """One rejected item (`file_clash`) for each file of `files_by_stem`'s clashes, keyed `<prefix>/<name>`."""
    for stem, paths in sorted(clashes.items()):
        names = ", ".join(p.name for p in paths)
        for path in paths:
            yield Item(f"{key_prefix}/{path.name}", reject=FILE_CLASH, detail=f"stem {stem!r} is shared by {names}")
