"""The source toolkit in uvd/source.py: limit_items, IMAGE_SUFFIXES, files_by_stem and the clash
rule every folder source shares (a clash is a reject or a ValueError, never a silently kept file),
and assemble_windows (the fixed-window assembly of video frames and multi-view renders)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_OVERRIDES
from uvd.recipe import load_recipe
from uvd.records import EMPTY_FILE, FILE_CLASH, INCOMPLETE_WINDOW, TOO_LARGE, ImageRecord, Item, Reject, Sentence
from uvd.registry import get_source
from uvd.source import (
    IMAGE_SUFFIXES, UnitImages, assemble_windows, clash_rejects, files_by_stem, input_file_unit, limit_items,
)

RECIPES = Path(__file__).parents[1] / "recipes"


def test_limit_items_takes_the_first_and_stops_the_reader():
    pulled = []
    closed = []

    def reader():
        try:
            for i in range(10):
                pulled.append(i)
                yield Item(str(i))
        finally:
            closed.append(True)

    assert [i.key for i in limit_items(reader(), 3)] == ["0", "1", "2"]
    assert pulled == [0, 1, 2] and closed == [True]  # no 4th item read; the reader is closed
    pulled.clear()
    assert len(list(limit_items(reader(), None))) == 10 and pulled == list(range(10))
    assert list(limit_items(reader(), 0)) == []
    assert [i.key for i in limit_items(iter([Item("a")]), 5)] == ["a"]  # fewer than the limit; a plain iterator


def test_one_image_suffix_set():
    assert IMAGE_SUFFIXES[:2] == (".jpg", ".jpeg") and len(set(IMAGE_SUFFIXES)) == len(IMAGE_SUFFIXES)
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    from uvd.pipelines import laion_shards

    assert laion_shards.IMAGE_EXTENSIONS == tuple(s[1:] for s in IMAGE_SUFFIXES)


def test_files_by_stem_never_keeps_one_of_a_clash(tmp_path):
    for name in ("a.jpg", "a.PNG", "b.png", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "e.jpg").mkdir()  # a folder is not a file
    files, clashes = files_by_stem(tmp_path, IMAGE_SUFFIXES, on_clash="reject")
    assert files == {"b": tmp_path / "b.png", "d": tmp_path / "d.webp"}
    assert clashes == {"a": [tmp_path / "a.PNG", tmp_path / "a.jpg"]}
    assert files_by_stem(tmp_path, None)[0].keys() == {"b", "c", "d"}  # any suffix
    with pytest.raises(ValueError, match="a.PNG and a.jpg have the same name"):
        files_by_stem(tmp_path, IMAGE_SUFFIXES, on_clash="error")
    with pytest.raises(ValueError, match="on_clash"):
        files_by_stem(tmp_path, IMAGE_SUFFIXES, on_clash="last")
    assert files_by_stem(tmp_path / "missing") == ({}, {})
    rejects = list(clash_rejects(clashes, "folder"))
    assert [(r.key, r.reject) for r in rejects] == [("folder/a.PNG", FILE_CLASH), ("folder/a.jpg", FILE_CLASH)]
    assert "a.PNG, a.jpg" in rejects[0].detail


def _read_all(recipe):
    source = get_source(recipe.source)(recipe)
    return [item for unit in source.list_units() for item in source.read_unit(unit)]


def test_annotated_video_rejects_both_frames_of_a_clash_and_their_annotation(tmp_path):
    from uvd.demo.world_media import build_annotated_video_world

    world = build_annotated_video_world(tmp_path / "world", seed=0)
    recipe = load_recipe(RECIPES / "annotated_video.yaml", [f"inputs={world['path']}", *TEST_OVERRIDES])
    before = {i.key: i.reject for i in _read_all(recipe)}
    clip = Path(world["path"]) / "clip_a"
    shutil.copy(clip / "frames" / "000001.jpg", clip / "frames" / "000001.png")  # same stem, two frames
    shutil.copy(clip / "masks" / "000002.png", clip / "masks" / "000002.bmp")  # same stem, two masks
    after = {i.key: (i.reject, i.detail) for i in _read_all(recipe)}
    assert after["clip_a/frames/000001.jpg"][0] == after["clip_a/frames/000001.png"][0] == FILE_CLASH
    assert after["clip_a/masks/000001.png#segmentation"][0] == FILE_CLASH  # its frame is ambiguous
    assert after["clip_a/masks/000002.png#segmentation"][0] == after["clip_a/masks/000002.bmp#segmentation"][0] == FILE_CLASH
    assert before["clip_a/frames/000001.jpg"] == ""  # the same items read fine without the clash
    untouched = {k for k in before if not k.startswith(("clip_a/frames/000001", "clip_a/masks/000001", "clip_a/masks/000002",
                                                         "clip_a/frames/000002"))}
    assert all(after[k][0] == before[k] for k in untouched)


def test_dense_annotations_rejects_a_clashing_annotation(tmp_path):
    from uvd.demo.world_annotated import build_annotated_world

    world = build_annotated_world(tmp_path / "world", seed=0)
    dense = Path(world["dense"]["path"])
    recipe = load_recipe(RECIPES / "dense_annotations.yaml", [f"inputs={dense}", *TEST_OVERRIDES])
    before = {i.key: i.reject for i in _read_all(recipe)}
    (dense / "depth" / "000000.npy").write_bytes((dense / "depth" / "000001.npy").read_bytes())  # beside 000000.png
    (dense / "depth" / "zzz.png").write_bytes(b"a")
    (dense / "depth" / "zzz.npy").write_bytes(b"b")  # a clash with no image at all
    after = {i.key: (i.reject, i.detail) for i in _read_all(recipe)}
    assert after["dense/images/000000.png#depth"] == (FILE_CLASH, "depth/ has several files of its stem: 000000.npy, 000000.png")
    assert before["dense/images/000000.png#depth"] != FILE_CLASH
    assert after["dense/depth/zzz.npy"][0] == after["dense/depth/zzz.png"][0] == FILE_CLASH
    assert {k for k in after if k not in before} == {"dense/depth/zzz.npy", "dense/depth/zzz.png"}


def test_paired_folders_refuses_an_ambiguous_folder_when_listing(tmp_path):
    from uvd.demo.world_annotated import build_annotated_world

    paired = Path(build_annotated_world(tmp_path / "world", seed=0)["paired"]["path"])
    recipe = load_recipe(RECIPES / "paired_folders.yaml", [f"inputs={paired}", "sentence.task=denoising", *TEST_OVERRIDES])
    assert get_source("paired_folders")(recipe).list_units()
    shutil.copy(paired / "target" / "000001.png", paired / "target" / "000001.jpg")
    with pytest.raises(ValueError, match="000001.jpg and 000001.png have the same name"):
        get_source("paired_folders")(recipe).list_units()


def test_semantic_folders_rejects_both_images_of_a_clash(tmp_path):
    from uvd.demo.world_annotated import build_ade20k_world

    world = build_ade20k_world(tmp_path / "ade20k", seed=0)
    recipe = load_recipe(RECIPES / "semantic_folders.yaml", [f"inputs={world['path']}", *TEST_OVERRIDES])
    images = next(Path(world["path"]).rglob("images/validation"))
    before = {i.key: i.reject for i in _read_all(recipe)}
    first = sorted(images.iterdir())[0]
    shutil.copy(first, first.with_suffix(".png"))
    after = {i.key: i.reject for i in _read_all(recipe)}
    clashing = {k for k in after if first.stem in k}
    assert {k.rpartition("/")[2] for k in clashing} == {first.name, first.with_suffix(".png").name}
    assert all(after[k] == FILE_CLASH for k in clashing)
    assert {k: v for k, v in after.items() if k not in clashing} == {k: v for k, v in before.items() if first.stem not in k}


def test_assemble_windows_keeps_complete_windows_and_rejects_what_none_used():
    # the unit's tokenized images, in reading order; "x" was lost before tokenizing
    images = {k: ImageRecord(k, np.zeros(256, np.uint16), k * 4, 8, 8) for k in ("a", "f", "b", "c", "e", "d")}
    unit = UnitImages("clip.mp4", list(images.values()))
    windows = [
        ("w0", ["a", "b", "c"]),
        ("w1", ["f", "x"]),  # incomplete: f's only window
        ("w2", ["d", "c"]),  # overlaps w0 on c; images in the window's order, not the unit's
    ]
    calls = []

    def make_sentence(label, window_images):
        calls.append(label)
        return Sentence(f"task_{label}", window_images, meta={"window": label})

    out = list(assemble_windows(unit, windows, make_sentence, "lost a neighbour"))
    assert calls == ["w0", "w2"]  # never called for an incomplete window
    assert [(type(o), getattr(o, "task", None)) for o in out[:2]] == [(Sentence, "task_w0"), (Sentence, "task_w2")]
    assert [im.key for im in out[0].images] == ["a", "b", "c"] and out[0].images[0] is images["a"]
    assert [im.key for im in out[1].images] == ["d", "c"] and out[1].meta == {"window": "w2"}
    # then one reject per image no emitted window used (f: its window lost x; e: in no window), unit order
    assert out[2:] == [Reject("f", INCOMPLETE_WINDOW, "lost a neighbour", "clip.mp4"),
                       Reject("e", INCOMPLETE_WINDOW, "lost a neighbour", "clip.mp4")]
    assert list(assemble_windows(UnitImages("empty", []), windows, make_sentence, "-")) == []


def test_input_file_unit_names_the_file_and_refuses_empty_or_large_ones(tmp_path):
    (tmp_path / "sub").mkdir()
    ok, empty, large = tmp_path / "sub" / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    ok.write_bytes(b"x" * 10)
    empty.write_bytes(b"")
    large.write_bytes(b"x" * 11)
    names = {ok: "sub/a.mp4", empty: "b.mp4"}  # find_input_files' mapping (c: a unit it does not name)
    assert input_file_unit(str(ok), names, 10) == (ok, "sub/a.mp4", None)
    path, name, refused = input_file_unit(str(empty), names, 10)
    assert (path, name, refused.key, refused.reject) == (empty, "b.mp4", "b.mp4", EMPTY_FILE)
    path, name, refused = input_file_unit(str(large), names, 10)
    assert (name, refused.key, refused.reject) == ("c.mp4", "c.mp4", TOO_LARGE) and "11 bytes" in refused.detail
