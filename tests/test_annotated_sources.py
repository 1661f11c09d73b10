"""The annotated sources (coco, dense_annotations, paired_folders, derived_pairs) on the sample
world's annotated sets: on plain lists without Ray, then once end to end through Ray."""
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TEST_OVERRIDES
from uvd.pipelines import pairing as P
from uvd import manifest as M
from uvd.recipe import load_recipe, recipe_from_dict
from uvd.records import Item
from uvd.work import preprocess_item
from uvd.runner import run_recipe
from plain_run import run_plain

RECIPES = Path(__file__).parents[1] / "recipes"
# (recipe, world set, extra overrides)
JOBS = {
    "coco": ("coco", []),
    "dense_annotations": ("dense", []),
    "paired_folders": ("paired", ["sentence.task=denoising"]),
    "derived_pairs": ("photos", []),
}


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    from uvd.demo.world_annotated import build_annotated_world

    return build_annotated_world(tmp_path_factory.mktemp("annotated") / "world", seed=0)


def recipe(name, annotated, *extra):
    world, overrides = JOBS[name]
    return load_recipe(RECIPES / f"{name}.yaml", [f"inputs={annotated[world]['path']}", *overrides, *TEST_OVERRIDES, *extra])


def expected_tasks(name, annotated, epochs=1):
    info = annotated[JOBS[name][0]]
    tasks = {task: epochs * n // 8 for task, n in info["pairs"].items()}
    if name == "coco":
        tasks[P.TUPLE_TASK] = info["tuples"]
    return tasks


@pytest.mark.parametrize("name", list(JOBS))
def test_every_item_is_in_a_sentence_or_rejected_for_its_reason(name, annotated):
    info = annotated[JOBS[name][0]]
    sentences, rejects, items, _ = run_plain(recipe(name, annotated, "sentence.epochs=1"))
    assert len(items) == info["items"]
    assert Counter(s.task for s in sentences) == expected_tasks(name, annotated)
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r.reason, []).append(r.key)
    assert {k: sorted(v) for k, v in by_reason.items()} == {k: sorted(v) for k, v in info["keys_by_reason"].items()}
    used = {im.key for s in sentences for im in s.images}
    assert len(used) == info["images"] and used.isdisjoint(r.key for r in rejects)
    for s in sentences:
        if s.task != P.TUPLE_TASK:
            assert len(s.images) == 16 and s.meta["layout"] == "pairs"


def test_coco_renderings_are_aligned_with_their_image(annotated):
    sentences, _, _, pixels = run_plain(recipe("coco", annotated))
    det = pixels["val/000000.jpg#detection"].astype(int)
    image = pixels["val/000000.jpg"].astype(int)
    changed = np.abs(det - image).sum(axis=2) > 60
    assert 0.02 < changed.mean() < 0.6  # box outlines and the tint inside the boxes, not the whole image
    pose = pixels["val/000000.jpg#pose"]
    assert pose[:, :20].max() == 0 and pose.any()  # skeleton on black
    seg = pixels["val/000000.jpg#segmentation"]
    colors = {tuple(int(v) for v in c) for c in np.unique(seg.reshape(-1, 3), axis=0)}
    # label maps are resized nearest-neighbour: only palette colors (background/ignore black, 1 person, 2 ball, 3 box)
    assert colors == {(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)}
    tuples = [s for s in sentences if s.task == P.TUPLE_TASK]
    assert all(2 <= len(s.images) <= 4 for s in tuples)


def test_coco_pose_over_image_and_task_selection(annotated):
    sentences, _, _, pixels = run_plain(recipe("coco", annotated, "sentence.pose_background=image", "sentence.tasks=[pose]", "sentence.tuples=false"))
    assert set(s.task for s in sentences) == {"pose"}
    assert pixels["val/000000.jpg#pose"][:, :20].any()  # the photo shows through
    assert not any(k.endswith("#detection") for k in pixels)


def test_dense_edges_computed_with_canny(annotated):
    job = recipe("dense_annotations", annotated, "sentence.edges_from=canny", "sentence.canny_low=50", "sentence.canny_high=150")
    sentences, rejects, _, pixels = run_plain(job)
    assert Counter(s.task for s in sentences)["edges"] == 2
    assert not any(r.reason == "bad_annotation" for r in rejects)  # the broken edge file is not read
    # the reference: OpenCV's Canny on the image as PIL decodes it, white edges on black, then the shared resize
    with Image.open(Path(annotated["dense"]["path"]) / "images" / "000000.png") as img:
        gray = np.asarray(img.convert("RGB").convert("L"))
    edges = cv2.Canny(gray, 50, 150)
    assert 0 < (edges > 0).mean() < 0.5  # a real edge map, neither empty nor everything
    expected, *_ = preprocess_item(Item("ref", array=np.repeat(edges[..., None], 3, axis=2)), job.image, job.filters)
    got = pixels["dense/images/000000.png#edges"]
    assert np.array_equal(got, expected)
    other_thresholds = cv2.Canny(gray, 100, 200)
    assert not np.array_equal(edges, other_thresholds)  # so the options, not the defaults, made `got`


def test_derived_pairs_are_deterministic_and_epochs_repair(annotated):
    a = run_plain(recipe("derived_pairs", annotated, "sentence.epochs=2"))
    b = run_plain(recipe("derived_pairs", annotated, "sentence.epochs=2"))
    assert [[im.key for im in s.images] for s in a[0]] == [[im.key for im in s.images] for s in b[0]]
    assert Counter(s.task for s in a[0]) == {"colorization": 4, "inpainting": 4}
    assert all(np.array_equal(a[3][k], b[3][k]) for k in a[3])  # same black boxes
    s = next(s for s in a[0] if s.task == "colorization")
    assert s.images[0].key.endswith("#colorization") and s.images[1].key == s.images[0].key.split("#")[0]


@pytest.mark.parametrize(
    "source, sentence, field",
    [
        ("coco", {"tasks": ["boxes"]}, "sentence.tasks"),
        ("coco", {"pose_background": "white"}, "sentence.pose_background"),
        ("dense_annotations", {"edges_from": "sobel"}, "sentence.edges_from"),
        ("paired_folders", {"task": "De-Raining"}, "sentence.task"),
        ("derived_pairs", {"box_size": [0.5, 0.1]}, "sentence.box_size"),
        ("derived_pairs", {"pairs_per_sentence": 10}, "sentence.pairs_per_sentence"),
    ],
)
def test_bad_sentence_options_are_named(source, sentence, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        recipe_from_dict({"source": source, "inputs": "/tmp", "sentence": sentence})


# ------------------------------------------------------------------ end to end, through Ray


@pytest.fixture(scope="module")
def runs(ray_local, annotated, tmp_path_factory):
    out = {}
    for name in JOBS:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, run_recipe(recipe(name, annotated, "sentence.epochs=1"), folder, progress=False))
    return out


@pytest.mark.parametrize("name", list(JOBS))
def test_end_to_end_shards_and_rejects(name, runs, annotated):
    out, summary = runs[name]
    info = annotated[JOBS[name][0]]
    manifest = M.read_manifest(out)
    assert manifest["status"] == "complete"
    rows = [row for shard in sorted(manifest["shards"]) for row in pq.read_table(out / shard).to_pylist()]
    assert Counter(row["task"] for row in rows) == expected_tasks(name, annotated)
    for row in rows:
        assert row["source"] == name and len(row["tokens"]) == 256 * row["num_images"] == 256 * len(row["images"])
        meta = json.loads(row["meta"])
        assert {"annotation", "layout", "epoch"} <= set(meta)
    rejects = M.read_rejects(out).to_pylist()
    assert dict(Counter(r["reason"] for r in rejects)) == info["expected_rejects"]
    assert summary.rejected == sum(info["expected_rejects"].values())
    assert len({key for row in rows for key in row["images"]}) == info["images"]


def test_pairs_shuffle_across_windows_of_units_the_same_for_any_part_size(ray_local, annotated, tmp_path):
    """`sentence.shuffle_units: 3`: pairs are shuffled across windows of 3 consecutive units. A Ray run
    cuts the same windows whatever the part size (a window's owner reads its neighbours' work files),
    and they equal the plain in-memory assembly; every image is in one sentence or one reject, and
    a reject names the unit its input came from."""
    overrides = ("sentence.files_per_unit=3", "sentence.shuffle_units=3", "sentence.epochs=1")
    plain, plain_rejects, items, _ = run_plain(recipe("derived_pairs", annotated, *overrides))
    runs = {}
    for upp in (1, 2, 4):
        out = tmp_path / f"upp{upp}"
        run_recipe(recipe("derived_pairs", annotated, *overrides, f"output.units_per_part={upp}"), out, progress=False)
        rows = [row for shard in sorted(M.read_manifest(out)["shards"]) for row in pq.read_table(out / shard).to_pylist()]
        runs[upp] = (sorted((r["id"], r["task"], tuple(r["images"]), tuple(r["tokens"])) for r in rows),
                     sorted((r["key"], r["reason"], r["unit"]) for r in M.read_rejects(out).to_pylist()))
    assert runs[1] == runs[2] == runs[4]
    sentences, rejects = runs[1]
    rows = [s.to_row("derived_pairs") for s in plain]
    assert sorted((s[0], s[2]) for s in sentences) == sorted((r["id"], tuple(r["images"])) for r in rows)
    assert sorted((k, r) for k, r, _ in rejects) == sorted((r.key, r.reason) for r in plain_rejects)
    # windows, not units: a sentence mixes images of several units (3 files a unit, 8 pairs a sentence)
    from uvd.registry import get_source

    source = get_source("derived_pairs")(recipe("derived_pairs", annotated, *overrides))
    units = source.list_units()
    file_unit = {}
    for unit in units:
        for item in source.read_unit(unit):
            file_unit[item.key.split("#")[0]] = unit
    assert len(units) >= 6
    assert all(len({file_unit[k.split("#")[0]] for k in s[2]}) >= 2 for s in sentences)
    assert all(file_unit[k.split("#")[0]] == unit for k, _, unit in rejects if k.split("#")[0] in file_unit)
    used = [k for s in sentences for k in s[2]]
    renderings = [k for k in used if "#" in k]  # each rendering in one sentence; an input once per task
    assert len(renderings) == len(set(renderings)) and set(used).isdisjoint(k for k, _, _ in rejects)
    assert len(set(used)) + len(rejects) == len({i.key for i in items})
