"""ADE20K and Pascal VOC folder layouts: every item in a sentence or rejected for its reason, palettes,
splits, and the layout errors a user can make."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_OVERRIDES
from uvd.pipelines import render
from plain_run import run_plain
from uvd.recipe import load_recipe
from uvd.registry import get_source

RECIPE = Path(__file__).parents[1] / "recipes" / "semantic_folders.yaml"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from uvd.demo.world_annotated import build_ade20k_world, build_voc_world

    root = tmp_path_factory.mktemp("semantic")
    return {"ade20k": build_ade20k_world(root / "ade20k", seed=0), "voc": build_voc_world(root / "voc", seed=0)}


def recipe(path, *extra):
    return load_recipe(RECIPE, [f"inputs={path}", *TEST_OVERRIDES, *extra])


@pytest.mark.parametrize("name", ["ade20k", "voc"])
def test_every_item_is_in_a_sentence_or_rejected_for_its_reason(name, worlds):
    info = worlds[name]
    sentences, rejects, items, _ = run_plain(recipe(info["path"]))
    assert len(items) == info["items"]
    assert Counter(s.task for s in sentences) == {"segmentation": info["pairs"]["segmentation"] // 8}
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r.reason, []).append(r.key)
    assert {k: sorted(v) for k, v in by_reason.items()} == {k: sorted(v) for k, v in info["keys_by_reason"].items()}
    used = {im.key for s in sentences for im in s.images}
    assert len(used) == info["images"]
    for s in sentences:
        assert [im.meta["role"] for im in s.images] == ["input", "segmentation"] * 8


def _labels(path, size=256):
    return np.asarray(Image.open(path).resize((size, size), Image.NEAREST))


def test_ade20k_uses_its_palette_and_other_is_black(worlds):
    base = Path(worlds["ade20k"]["path"])
    _, _, _, pixels = run_plain(recipe(base))
    labels = _labels(base / "annotations/validation/ADE_val_00000001.png")
    out = pixels["ADEChallengeData2016/validation/ADE_val_00000001.jpg#segmentation"]
    assert np.array_equal(out[labels == 0], np.zeros(((labels == 0).sum(), 3), np.uint8))
    for c in set(np.unique(labels).tolist()) - {0}:
        assert (out[labels == c] == render.ADE20K_PALETTE[c]).all()
    assert tuple(render.ADE20K_PALETTE[1]) == (120, 120, 120) and tuple(render.ADE20K_PALETTE[150]) == (92, 0, 255)
    assert tuple(render.ADE20K_PALETTE[13]) == (150, 5, 61)  # "person" in ADE20K's palette


def test_voc_boundaries_are_black_and_splits_come_from_imagesets(worlds):
    info = worlds["voc"]
    rec = recipe(info["path"])
    units = get_source("semantic_folders")(rec).list_units()
    assert [Path(u).name for u in units] == ["train#0", "val#0"]  # trainval left out: it repeats train + val
    _, _, items, pixels = run_plain(rec)
    assert not any("2008_" in item.key for item in items)  # detection-only JPEGs are not in the set
    labels = _labels(Path(info["path"]) / "VOC2012/SegmentationClass/2007_000000.png")
    out = pixels["VOC2012/train/2007_000000.jpg#segmentation"]
    assert (labels == 255).any() and not out[labels == 255].any()
    for c in set(np.unique(labels).tolist()) - {255}:
        assert (out[labels == c] == render.PALETTE[c]).all()
    only_val = run_plain(recipe(info["path"], "sentence.splits=[val]"))[0]
    assert {im.key.split("/")[1] for s in only_val for im in s.images} == {"val"}


def test_units_of_bounded_size(worlds):
    sentences, _, items, _ = run_plain(recipe(worlds["ade20k"]["path"], "sentence.images_per_unit=8"))
    assert len(items) == worlds["ade20k"]["items"]
    assert len(sentences) == 2  # 8 + 8 good images in the first two units; the third holds the broken ones


@pytest.mark.parametrize(
    "overrides, match",
    [(["sentence.layout=voc"], "is not a voc folder"), (["sentence.splits=[test]"], "sentence.splits"), (["sentence.layout=cityscapes"], "sentence.layout")],
)
def test_user_mistakes_are_named(worlds, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_source("semantic_folders")(recipe(worlds["ade20k"]["path"], *overrides)).list_units()
