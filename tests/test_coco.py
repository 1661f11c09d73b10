"""COCO as it ships: instance masks (polygons, crowd RLE both ways) against independent references,
the semantic label map, units of bounded size, unavailable tasks, the explicit label-map option."""
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image, ImageDraw

from conftest import TEST_OVERRIDES
from uvd.pipelines import coco_masks, render
from uvd.pipelines import pairing as P
from uvd.records import RejectError
from plain_run import run_plain
from uvd.recipe import load_recipe
from uvd.registry import get_source

RECIPE = Path(__file__).parents[1] / "recipes" / "coco.yaml"


@pytest.fixture(scope="module")
def coco_world(tmp_path_factory):
    from uvd.demo.world_annotated import build_coco_world

    return build_coco_world(tmp_path_factory.mktemp("coco") / "coco", seed=1)


def recipe(path, *extra):
    return load_recipe(RECIPE, [f"inputs={path}", *TEST_OVERRIDES, *extra])


def runs_of(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE, written out by hand: column-major runs, starting with zeros."""
    runs, value, count = [], 0, 0
    for v in mask.flatten(order="F"):
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    return runs + [count]


def test_rle_uncompressed_and_compressed_decode_to_the_mask():
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 31)) < 0.3).astype(np.uint8)
    mask[0, 0] = 1  # a mask that starts with a 1-run: the counts start with a zero
    compressed = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    for counts in (runs_of(mask), compressed):
        out = coco_masks.annotation_mask({"size": [23, 31], "counts": counts}, 23, 31)
        assert out.dtype == bool and np.array_equal(out, mask.astype(bool))


def test_polygon_parts_match_an_independent_rasterization():
    parts = [[10, 10, 60, 12, 55, 50, 12, 45], [70.5, 20.5, 90, 20, 90, 60, 75, 58, 70, 40], [1, 1, 3, 1]]  # last: no area
    out = coco_masks.annotation_mask(parts, 64, 100)
    img = Image.new("L", (100, 64), 0)
    outline = Image.new("L", (100, 64), 0)
    for part in parts[:2]:
        ImageDraw.Draw(img).polygon(part, fill=1)
        ImageDraw.Draw(outline).line(part + part[:2], fill=1, width=3)
    reference = np.asarray(img).astype(bool)
    differ = out ^ reference
    assert (out & reference).sum() / (out | reference).sum() > 0.9  # PIL fills the outline pixels too
    assert not (differ & ~np.asarray(outline).astype(bool)).any()  # they differ only along the outlines
    assert out[30, 30] and out[40, 80] and not out[30, 65] and not out[2, 2]


@pytest.mark.parametrize(
    "segmentation, reason",
    [
        ({"size": [10, 12], "counts": [5, 3]}, render.BAD_ANNOTATION),  # counts do not cover 10x12
        ({"size": [5, 12], "counts": [60]}, render.MISMATCHED_ANNOTATION),
        ({"size": [10, 12], "counts": "zzzz"}, render.BAD_ANNOTATION),
        ([[1, 2, 3, 4, 5]], render.BAD_ANNOTATION),  # odd number of coordinates
        ([["a", 1, 2, 3, 4, 5]], render.BAD_ANNOTATION),
        ("mask", render.BAD_ANNOTATION),
    ],
)
def test_malformed_masks_are_refused_with_their_reason(segmentation, reason):
    with pytest.raises(RejectError) as err:
        coco_masks.annotation_mask(segmentation, 10, 12)
    assert err.value.reason == reason


def test_semantic_labels_map_sorted_category_ids_crowd_and_paint_order():
    index = coco_masks.palette_indices([{"id": 90}, {"id": 1}, {"id": 44}])
    assert index == {1: 1, 44: 2, 90: 3}
    big = {"category_id": 90, "segmentation": [[0, 0, 40, 0, 40, 40, 0, 40]], "iscrowd": 0}
    small = {"category_id": 44, "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]], "iscrowd": 0}
    crowd_mask = np.zeros((40, 50), np.uint8)
    crowd_mask[30:40, 30:50] = 1
    crowd = {"category_id": 1, "segmentation": {"size": [40, 50], "counts": runs_of(crowd_mask)}, "iscrowd": 1}
    boxes_only = {"category_id": 1, "bbox": [0, 0, 5, 5]}
    labels = coco_masks.semantic_labels([small, crowd, big, boxes_only], index, 40, 50)
    assert labels[15, 15] == 2  # the small object on the big one stays visible, whatever the order
    assert labels[5, 5] == 3 and labels[35, 45] == 255 and labels[5, 45] == 0
    assert labels[35, 35] == 3  # an instance is painted over the crowd around it
    assert coco_masks.semantic_labels([crowd], index, 40, 50, crowd="category")[35, 45] == 1
    assert coco_masks.semantic_labels([boxes_only], index, 40, 50) is None
    rendered = render.render_segmentation(labels)
    assert tuple(rendered[35, 45]) == (0, 0, 0) and tuple(rendered[5, 5]) == tuple(render.PALETTE[3])
    with pytest.raises(RejectError, match="unknown category_id"):
        coco_masks.semantic_labels([{**small, "category_id": 2}], index, 40, 50)


def test_demo_segmentation_is_the_rasterized_json(coco_world):
    """The source's rendering of an image equals the label map built here from its JSON entries."""
    _, _, _, pixels = run_plain(recipe(coco_world["path"]))
    data = json.loads((Path(coco_world["path"]) / "annotations/instances_val.json").read_text())
    anns = [a for a in data["annotations"] if a["image_id"] == 4]  # val/000003.jpg: compressed crowd RLE
    assert isinstance(anns[-1]["segmentation"]["counts"], str) and len(anns[2]["segmentation"]) == 3
    index = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    labels = np.zeros((144, 192), np.uint8)
    for ann in sorted(anns, key=lambda a: (not a["iscrowd"], -int(mask_utils.area(_rle(a))))):
        labels[mask_utils.decode(_rle(ann)).astype(bool)] = 255 if ann["iscrowd"] else index[ann["category_id"]]
    expected = render.render_segmentation(np.asarray(Image.fromarray(labels).resize((256, 256), Image.NEAREST)))
    assert np.array_equal(pixels["val/000003.jpg#segmentation"], expected)
    colors = {tuple(c) for c in expected.reshape(-1, 3)}
    assert colors == {(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)}


def _rle(ann):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, 144, 192))
    return mask_utils.frPyObjects(seg, 144, 192) if isinstance(seg["counts"], list) else {**seg, "counts": seg["counts"].encode()}


def test_units_of_bounded_size_pair_within_the_unit(coco_world):
    rec = recipe(coco_world["path"], "sentence.images_per_unit=8")
    source = get_source("coco")(rec)
    root = Path(coco_world["path"]).resolve()
    assert source.list_units() == [f"{root}/train#0", f"{root}/val#0", f"{root}/val#8", f"{root}/val#16"]
    sentences, rejects, items, _ = run_plain(rec)
    assert len(items) == coco_world["items"]
    assert Counter(r.reason for r in rejects) == coco_world["expected_rejects"]
    unit_of = {}
    for unit in source.list_units():
        for item in source.read_unit(unit):
            unit_of[item.key] = unit
    assert len(unit_of) == len(items)  # no item read twice by two units
    for s in sentences:
        assert len({unit_of[im.key] for im in s.images}) == 1
    # 8 good images in val#0 and val#8 each: one sentence per task in each
    assert Counter(s.task for s in sentences if s.task != P.TUPLE_TASK) == {"detection": 2, "pose": 2, "segmentation": 2}


def test_unavailable_task_is_logged_once_and_noted(coco_world, tmp_path, caplog):
    root = tmp_path / "coco"
    shutil.copytree(coco_world["path"], root)
    (root / "annotations/person_keypoints_val.json").unlink()
    rec = recipe(root, "sentence.images_per_unit=8")
    source = get_source("coco")(rec)
    with caplog.at_level(logging.WARNING, logger="uvd.pipelines.coco"):
        units = source.list_units()
    warnings = [r.getMessage() for r in caplog.records if "val: task pose is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "person_keypoints_val.json" in warnings[0]
    assert source.unit_notes(units[1]) == {"unavailable_tasks": {"pose": "no annotations/person_keypoints_val.json"}}
    assert get_source("coco")(rec).unit_notes(units[1]) == source.unit_notes(units[1])  # also without list_units first
    sentences, rejects, _, pixels = run_plain(rec)
    assert not any(k.endswith("#pose") for k in pixels) and "pose" not in {s.task for s in sentences}
    assert not any("pose" in r.key for r in rejects)  # an unavailable task is no per-image reject
    assert Counter(s.task for s in sentences)["segmentation"] == 2
    only_pose = get_source("coco")(recipe(root, "sentence.tasks=[pose]"))
    assert only_pose.list_units() == []  # no split can provide pose: nothing to read, no per-image rejects


def test_size_mismatch_is_judged_per_task_with_annotations(coco_world, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_world["path"], root)
    path = root / "annotations/person_keypoints_val.json"
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 500  # only the keypoints file says val/000000.jpg is 500 wide
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]  # val/000001.jpg: no person
    path.write_text(json.dumps(data))
    _, rejects, _, pixels = run_plain(recipe(root))
    assert {r.key: r.reason for r in rejects}["val/000000.jpg#pose"] == render.MISMATCHED_ANNOTATION
    assert "val/000001.jpg#pose" not in pixels and "val/000001.jpg#pose" not in {r.key for r in rejects}
    assert "val/000001.jpg#detection" in pixels


def test_label_maps_only_as_an_explicit_option(coco_world, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_world["path"], root)
    (root / "labels/val").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(np.full((144, 192), 3, np.uint8)).save(root / f"labels/val/{i:06d}.png")
    Image.fromarray(np.full((10, 10), 3, np.uint8)).save(root / "labels/val/000011.png")
    sentences, rejects, _, pixels = run_plain(recipe(root, "sentence.segmentation_from=label_maps", "sentence.tasks=[segmentation]"))
    assert (pixels["val/000004.jpg#segmentation"] == render.PALETTE[3]).all()
    reasons = {r.key: r.reason for r in rejects}
    assert reasons["val/000011.jpg#segmentation"] == render.MISMATCHED_ANNOTATION
    assert reasons["val/000012.jpg#segmentation"] == P.MISSING_ANNOTATION
    assert Counter(s.task for s in sentences) == {"segmentation": 1, P.TUPLE_TASK: 10}
    default = run_plain(recipe(root, "sentence.tasks=[segmentation]"))[3]
    assert not (default["val/000004.jpg#segmentation"] == render.PALETTE[3]).all()  # PNGs are ignored by default


def test_units_through_ray_match_the_plain_run(ray_local, coco_world, tmp_path):
    """Unit names with `#<start>` go through the Ray job; the shards hold what the plain run makes."""
    import pyarrow.parquet as pq

    from uvd import manifest as M
    from uvd.runner import run_recipe

    rec = recipe(coco_world["path"], "sentence.images_per_unit=8")
    sentences, rejects, _, _ = run_plain(rec)
    summary = run_recipe(rec, tmp_path / "out", progress=False)
    manifest = M.read_manifest(tmp_path / "out")
    rows = [row for shard in sorted(manifest["shards"]) for row in pq.read_table(tmp_path / "out" / shard).to_pylist()]
    assert sorted(row["id"] for row in rows) == sorted(s.sentence_id("coco") for s in sentences)
    assert summary.rejected_by_reason == dict(sorted(Counter(r.reason for r in rejects).items()))
