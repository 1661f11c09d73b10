"""Labelers inside the Ray job: two cheap labelers (Canny and a tiny Depth Anything with random
weights saved with save_pretrained) on the demo world's laion shard. Their renderings pair with
the inputs in 8-pair sentences and multi-annotation tuples beside the source's own sentences,
every label image ends in a sentence or a reject, the tokens are those of the labels the run
saved, a rerun is a no-op, changed weights redo the work, and a bad weights folder fails first."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import TEST_OVERRIDES
from uvd.pipelines import render
from uvd.pipelines.labelers import decode_label
from uvd import layout as L
from uvd import manifest as M
from uvd.recipe import load_recipe
from uvd.registry import get_source, get_tokenizer_stage
from uvd.runner import run_recipe
from uvd.work import preprocess_item

RECIPES = Path(__file__).parents[1] / "recipes"


def save_depth_model(folder: Path, seed: int) -> Path:
    from transformers import AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config

    torch.manual_seed(seed)
    dinov2 = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=70,
                          out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=dinov2, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                 reassemble_hidden_size=32, head_hidden_size=8, patch_size=14)
    AutoModelForDepthEstimation.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 70, "width": 70}, "ensure_multiple_of": 14}))
    return folder


def labeled_recipe(tmp: Path, inputs: str, models: list[dict], *extra: str, source: str = "laion", save: bool = True):
    data = yaml.safe_load((RECIPES / f"{source}.yaml").read_text())
    data["labelers"] = {"save": save, "models": models}
    path = tmp / f"{source}_labeled.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path, [f"inputs={inputs}", *TEST_OVERRIDES, *extra])


MODELS = lambda depth: [  # noqa: E731
    {"name": "edges", "kind": "edges", "batch_size": 8, "cpus_per_actor": 0.25},
    {"name": "depth", "kind": "depth", "weights": str(depth), "batch_size": 4, "cpus_per_actor": 0.25},
]


@pytest.fixture(scope="module")
def laion_world(tmp_path_factory):
    from uvd.demo.world import build_laion_world

    return build_laion_world(tmp_path_factory.mktemp("laion_world"), num_shards=1, images_per_shard=40, seed=0)


@pytest.fixture(scope="module")
def labeled(ray_local, laion_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labeled")
    depth = save_depth_model(tmp / "depth", seed=0)
    recipe = labeled_recipe(tmp, laion_world["path"], MODELS(depth), "filters.min_side=0")
    out = tmp / "run"
    summary = run_recipe(recipe, out, progress=False)
    return recipe, out, summary, depth


def rows_of(out: Path) -> list[dict]:
    manifest = M.read_manifest(out)
    return [row for name in sorted(manifest["shards"]) for row in pq.read_table(out / name).to_pylist()]


def test_labelers_pair_beside_the_sources_own_sentences(labeled, laion_world):
    recipe, out, summary, _ = labeled
    rows = rows_of(out)
    rejects = M.read_rejects(out).to_pylist()
    labels = pq.read_table(out / L.labels_name("laion", 0)).to_pylist()
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    singles = {row["images"][0] for row in by_task["single"]}
    # the source's own sentences are untouched: one per kept, non-duplicate input, none a label
    assert singles and not any("#" in k for k in singles)
    # every kept input (before dedup) got exactly one rendering per labeler, in the labels file
    record = L.read_json(out / L.PARTS_DIR / "000000.json", "record")
    kept = sum(u[2] for u in record["per_unit"])
    assert sorted(r["labeler"] for r in labels) == ["depth"] * kept + ["edges"] * kept
    assert all(r["key"] == f"{r['input']}#{r['labeler']}" for r in labels)
    # 8-pair sentences per labeler: (x, x#name) eight times, inputs the source kept
    for name in ("edges", "depth"):
        sentences = by_task[name]
        assert len(sentences) == len(singles) // 8
        for row in sentences:
            assert row["num_images"] == 16 and len(row["tokens"]) == 16 * 256
            assert row["images"][1::2] == [f"{k}#{name}" for k in row["images"][0::2]]
            assert set(row["images"][0::2]) <= singles
    # multi-annotation tuples: m of {x, x#edges, x#depth} in that order, m in 2..3, one per input
    tuples = by_task["multi_annotation"]
    assert sorted(row["images"][0].split("#")[0] for row in tuples) == sorted(singles)
    for row in tuples:
        x = row["images"][0].split("#")[0]
        order = [x, f"{x}#edges", f"{x}#depth"]
        assert 2 <= row["num_images"] <= 3 and row["images"] == [k for k in order if k in row["images"]]
    assert {row["num_images"] for row in tuples} == {2, 3}
    # every rendering is in a sentence or a reject (never both), inputs are never reported unused
    used = {k for row in rows for k in row["images"]}
    rejected = {r["key"]: r["reason"] for r in rejects}
    for r in labels:
        assert (r["key"] in used) != (r["key"] in rejected), r["key"]
    duplicates = {r["key"] for r in rejects if r["reason"] == "duplicate"}
    for key, reason in rejected.items():
        if "#" in key:  # a label image left out: remainder of the cut, or its input was a duplicate
            assert reason == "unused_remainder" or (reason == "unpaired" and key.split("#")[0] in duplicates), (key, reason)
    assert not used & set(rejected)
    manifest = M.read_manifest(out)
    assert set(manifest["labelers"]) == {"edges", "depth"} and len(manifest["labelers"]["depth"]["weights_sha256"]) == 64
    assert summary.sentences == len(rows)
    # renderings left over are listed as rejects but are no inputs: the reject rate sees the inputs only
    assert manifest["totals"]["inputs"] == laion_world["items"] and manifest["totals"]["rejected"] == len(rejects)


def test_label_tokens_are_the_saved_labels_rendered_and_canny_of_the_input(labeled, laion_world):
    recipe, out, _, _ = labeled
    rows = rows_of(out)
    tokens = {}
    for row in rows:
        for i, key in enumerate(row["images"]):
            tokens[key] = np.asarray(row["tokens"][i * 256:(i + 1) * 256], np.uint16)
    labels = {r["key"]: decode_label(r["label"]) for r in pq.read_table(out / L.labels_name("laion", 0)).to_pylist()}
    stage = get_tokenizer_stage()(config="test", weights=None, device="cpu", dtype="float32", seed=recipe.tokenizer.seed)
    source = get_source("laion")(recipe)
    checked = 0
    for item in source.read_unit(source.list_units()[0]):
        key = f"{item.key}#edges"
        if item.reject or key not in tokens or f"{item.key}#depth" not in tokens:
            continue
        pixels = preprocess_item(item, recipe.image, recipe.filters)[0]
        edges = render.render_edges(labels[key])
        assert np.array_equal(edges, render.canny_edges(pixels))  # the label is Canny of the input's pixels
        depth = render.render_disparity(labels[f"{item.key}#depth"])
        direct = stage.encode_pixels(np.stack([pixels, edges, depth]))
        # batched convolutions round differently from single ones, which can flip a near-tie of
        # the quantizer: nearly every token agrees, and each image's tokens are its own
        for got, ref, other in ((tokens[item.key], direct[0], direct[1]), (tokens[key], direct[1], direct[2]),
                                (tokens[f"{item.key}#depth"], direct[2], direct[0])):
            assert (got == ref).mean() >= 0.95 and (got == other).mean() < 0.5
        checked += 1
    assert checked >= 3


def test_rerun_is_a_no_op_and_changed_weights_redo_the_work(labeled):
    recipe, out, first, depth = labeled
    before = {row["id"]: row for row in rows_of(out)}
    again = run_recipe(recipe, out, progress=False)
    assert again.already_complete or (again.parts_tokenized == 0 and again.parts_written == 0)
    save_depth_model(depth, seed=1)  # same folder, other weights
    changed = run_recipe(recipe, out, progress=False)
    assert changed.parts_tokenized == changed.parts_total == 1 and changed.parts_written == 1
    after = {row["id"]: row for row in rows_of(out)}
    assert set(after) == set(before)  # same keys, same pairing
    moved = {row["task"] for i, row in after.items() if row["tokens"] != before[i]["tokens"]}
    assert "depth" in moved and "edges" not in moved and "single" not in moved


def test_a_missing_weights_folder_fails_before_any_work(tmp_path, laion_world):
    missing = tmp_path / "no-such-model"
    recipe = labeled_recipe(tmp_path, laion_world["path"], [{"name": "depth", "kind": "depth", "weights": str(missing)}])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=str(missing)) as err:
        run_recipe(recipe, out, progress=False)
    assert "labelers.models[0]" in str(err.value)
    assert not out.exists()  # nothing was started or written
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    recipe = labeled_recipe(tmp_path, laion_world["path"], [{"name": "depth", "kind": "depth", "weights": str(tmp_path / "wrong")}])
    with pytest.raises(ValueError, match="config.json"):
        run_recipe(recipe, out, progress=False)
    assert not out.exists()


def test_the_labelers_section_is_validated_and_hashed(tmp_path, laion_world):
    base = labeled_recipe(tmp_path, laion_world["path"], [{"name": "edges", "kind": "edges"}])
    other = labeled_recipe(tmp_path, laion_world["path"], [{"name": "edges", "kind": "edges", "options": {"low": 50}}])
    faster = labeled_recipe(tmp_path, laion_world["path"], [{"name": "edges", "kind": "edges", "batch_size": 64}])
    plain = load_recipe(RECIPES / "laion.yaml", [f"inputs={laion_world['path']}", *TEST_OVERRIDES])
    assert base.work_identity() != other.work_identity() and base.hash() != other.hash()
    assert base.work_identity() == faster.work_identity() and base.hash() == faster.hash()  # execution only
    assert "labelers" not in plain.work_identity() and base.work_identity() != plain.work_identity()
    for models, field in (([{"name": "edges", "kind": "blur"}], "labelers.models[0].kind"),
                          ([{"name": "e", "kind": "edges"}, {"name": "e", "kind": "edges"}], "labelers.models"),
                          ([{"name": "edges", "kind": "edges", "speed": 1}], "labelers.models[0].speed")):
        with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
            labeled_recipe(tmp_path, laion_world["path"], models)


def test_labels_files_are_the_runs_own(tmp_path):
    run = tmp_path / "run"
    (run / L.LABELS_DIR).mkdir(parents=True)
    (run / L.labels_name("laion", 3)).write_bytes(b"x")
    L.check_out_dir(run)  # accepted as UVD's
    assert L.clear_run(run) == 1 and not (run / L.LABELS_DIR).exists()
    (run / L.LABELS_DIR).mkdir()
    (run / L.LABELS_DIR / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="labels/notes.txt"):
        L.check_out_dir(run)


def test_on_a_pairing_source_the_labeler_joins_its_task_list(ray_local, tmp_path):
    """derived_pairs: the labeler's name is one more task beside colorization and inpainting, and
    the multi-annotation tuples mix the derived images with the labeler's."""
    from uvd.demo.world_annotated import build_photo_folder

    photos = build_photo_folder(tmp_path / "photos", num_images=16)
    recipe = labeled_recipe(tmp_path, photos["path"], [{"name": "edges", "kind": "edges", "cpus_per_actor": 0.25}],
                            "sentence.tuples=true", "sentence.epochs=1", source="derived_pairs", save=False)
    out = tmp_path / "run"
    run_recipe(recipe, out, progress=False)
    rows = rows_of(out)
    rejects = {r["key"]: r["reason"] for r in M.read_rejects(out).to_pylist()}
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert set(by_task) == {"colorization", "inpainting", "edges", "multi_annotation"}
    assert len(by_task["edges"]) == 16 // 8  # 16 photos: two 8-pair sentences
    for row in by_task["edges"]:
        assert row["images"][1::2] == [f"{k}#edges" for k in row["images"][0::2]]
    roles = {k.split("#")[1] for row in by_task["multi_annotation"] for k in row["images"] if "#" in k}
    assert roles == {"colorization", "inpainting", "edges"}
    assert not (out / L.LABELS_DIR).exists()  # labelers.save is off
    used = {k for row in rows for k in row["images"]}
    inputs = [k for k in used if "#" not in k]
    assert len(inputs) == 16 and all(f"{k}#edges" in used or f"{k}#edges" in rejects for k in inputs)
    assert not used & set(rejects) and all("#edges" not in k for k in rejects)  # 16 photos: no remainder


def test_labeler_pools_must_leave_a_cpu_for_the_readers(ray_local, tmp_path, laion_world):
    from uvd.runner import _pool_plans

    fits = labeled_recipe(tmp_path, laion_world["path"], [{"name": "edges", "kind": "edges", "cpus_per_actor": 0.5}])
    assert [(p.where, p.use_gpu, p.num_actors) for p in _pool_plans(fits)] == [("tokenizer", False, 1), ("labelers.models[0]", False, 1)]
    crowded = labeled_recipe(tmp_path, laion_world["path"], [{"name": "edges", "kind": "edges", "cpus_per_actor": 0.75}])
    with pytest.raises(ValueError, match=r"labelers\.models\[0\]\.num_actors: 1 actors x 0\.75 CPU .* beside the other pools' 0\.5"):
        _pool_plans(crowded)


def test_a_global_source_plans_without_the_renderings(ray_local, world, tmp_path):
    """imagenet_groups plans its groups from per-unit counts: the renderings are not counted as
    images of a category, never land in a group, and pair beside the groups per class folder."""
    recipe = labeled_recipe(tmp_path, world["imagenet"]["path"], [{"name": "edges", "kind": "edges", "cpus_per_actor": 0.25}],
                            source="imagenet_groups", save=False)
    out = tmp_path / "run"
    run_recipe(recipe, out, progress=False)
    rows = rows_of(out)
    rejects = {r["key"]: r["reason"] for r in M.read_rejects(out).to_pylist()}
    groups = [row for row in rows if row["task"].startswith("category_k")]
    edges = [row for row in rows if row["task"] == "edges"]
    assert groups and edges and all("#" not in k for row in groups for k in row["images"])
    for row in edges:
        assert row["images"][1::2] == [f"{k}#edges" for k in row["images"][0::2]]
        assert len({k.split("/")[0] for k in row["images"]}) == 1  # pairs stay within a class folder (unit)
    used = {k for row in rows for k in row["images"]}
    assert not used & set(rejects)
    record = L.read_json(out / L.PARTS_DIR / "000000.json", "record")
    assert record["labelers"] == ["edges"]
    assert all(rejects[k] in ("unused_remainder", "unpaired") for k in rejects if "#" in k)
