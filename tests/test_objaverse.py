"""The `objaverse` source: camera parameters, deterministic renders, broken meshes, the
objaverse package's cache layout; on plain lists without Ray, then once end to end through Ray."""
import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path

os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")  # CPU rendering (before pyrender is imported)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from conftest import shipped_recipe  # noqa: E402
from uvd.pipelines.mesh_render import multiview_cameras  # noqa: E402
from uvd.pipelines.objaverse import ObjaverseOptions, view_key, view_windows  # noqa: E402
from uvd import manifest as M  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from uvd.runner import run_recipe  # noqa: E402
from plain_run import run_plain  # noqa: E402



@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    from uvd.demo.world_media import build_mesh_world

    return build_mesh_world(tmp_path_factory.mktemp("meshes") / "world", seed=0)


def recipe(path, *extra):
    return shipped_recipe("objaverse", path, *extra)


def test_cameras_24_azimuths_15_degrees_apart_in_range():
    for key in ("a.glb", "b.glb", "glbs/000-000/c.glb"):
        cams = multiview_cameras(key, seed=3)
        assert [c["azimuth_deg"] for c in cams] == [15.0 * i for i in range(24)]
        assert len({c["radius"] for c in cams}) == 1 and 1.5 <= cams[0]["radius"] <= 2.2
        assert len({c["elevation_deg"] for c in cams}) == 1 and -45 <= cams[0]["elevation_deg"] <= 45
        for c in cams:
            pose = np.array(c["pose"])
            assert np.allclose(np.linalg.norm(pose[:3, 3]), c["radius"], atol=1e-5)
            assert np.allclose(pose[:3, 2], pose[:3, 3] / c["radius"], atol=1e-5)  # looks at the origin (-z)
            elevation = np.degrees(np.arcsin(pose[1, 3] / c["radius"]))
            assert abs(elevation - c["elevation_deg"]) < 1e-3
    assert multiview_cameras("a.glb", seed=3) == multiview_cameras("a.glb", seed=3)
    assert multiview_cameras("a.glb", seed=3) != multiview_cameras("a.glb", seed=4)
    assert multiview_cameras("a.glb", seed=3) != multiview_cameras("b.glb", seed=3)
    radii = [multiview_cameras(f"{i}.glb", 0)[0]["radius"] for i in range(200)]
    assert 1.5 <= min(radii) < 1.6 and 2.1 < max(radii) <= 2.2


def test_view_windows():
    assert view_windows(ObjaverseOptions(cut="first")) == [list(range(16))]
    assert view_windows(ObjaverseOptions()) == [list(range(16)), list(range(8, 24))]
    assert view_windows(ObjaverseOptions(window=12, window_step=12)) == [list(range(12)), list(range(12, 24))]


def test_renders_sentences_and_rejects(meshes):
    sentences, rejects, _, pixels = run_plain(recipe(meshes["path"]))
    assert Counter(s.task for s in sentences) == {"multiview": 2 * len(meshes["meshes"])}
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r.reason, []).append(r.key)
    assert by_reason == meshes["keys_by_reason"]
    assert len(pixels) == 24 * len(meshes["meshes"])  # every view rendered once, used by one or two windows
    for s in sentences:
        assert len(s.images) == 16
        cams = s.meta["cameras"]
        assert [c["view"] for c in cams] == s.meta["views"]
        assert all(b["azimuth_deg"] - a["azimuth_deg"] == 15.0 for a, b in zip(cams, cams[1:]))
        assert cams == multiview_cameras(s.meta["object"], 0)[s.meta["views"][0] : s.meta["views"][-1] + 1]
    box = pixels[view_key("box.glb", 0)]
    assert box.shape == (256, 256, 3) and box.dtype == np.uint8
    assert (box == 255).all(axis=2).mean() > 0.5  # white background around the object
    assert 0.02 < (box != 255).any(axis=2).mean() < 0.5  # the object is in view, not cut off
    assert np.abs(pixels[view_key("cone.obj", 0)].astype(int) - pixels[view_key("cone.obj", 3)].astype(int)).mean() > 2


def test_same_seed_same_renders_and_first_cut(meshes):
    first, _, _, px1 = run_plain(recipe(meshes["path"], "sentence.cut=first", "sentence.background=[0.0, 0.0, 0.0]"))
    assert Counter(s.task for s in first) == {"multiview": len(meshes["meshes"])}
    assert {int(k[-2:]) for k in px1} == set(range(16))  # views 16-23 are never rendered
    again, _, _, px2 = run_plain(recipe(meshes["path"], "sentence.cut=first", "sentence.background=[0.0, 0.0, 0.0]"))
    assert [s.meta["cameras"] for s in first] == [s.meta["cameras"] for s in again]
    assert all(np.array_equal(px1[k], px2[k]) for k in px1)
    assert (px1[view_key("box.glb", 0)] == 0).all(axis=2).mean() > 0.5  # configurable background


def test_objaverse_cache_layout(meshes, tmp_path):
    pytest.importorskip("objaverse")
    uid = "0123456789abcdef0123456789abcdef"
    cache = tmp_path / "hf-objaverse-v1"
    (cache / "glbs" / "000-000").mkdir(parents=True)
    shutil.copy(Path(meshes["path"]) / "box.glb", cache / "glbs" / "000-000" / f"{uid}.glb")
    with gzip.open(cache / "object-paths.json.gz", "wt") as f:
        json.dump({uid: f"glbs/000-000/{uid}.glb"}, f)
    sentences, rejects, _, _ = run_plain(recipe(cache, f"sentence.uids=[{uid}]", "sentence.cut=first"))
    assert [s.meta["object"] for s in sentences] == [f"glbs/000-000/{uid}.glb"] and not rejects


@pytest.mark.parametrize(
    "sentence, field",
    [
        ({"renderer": "opengl"}, "sentence.renderer"),
        ({"cut": "random"}, "sentence.cut"),
        ({"window": 20}, "sentence.window"),
        ({"radius": [2.2, 1.5]}, "sentence.radius"),
        ({"elevation": [-100, 45]}, "sentence.elevation"),
        ({"background": [255, 255, 255]}, "sentence.background"),
    ],
)
def test_bad_sentence_options_are_named(sentence, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        recipe_from_dict({"source": "objaverse", "inputs": "/tmp", "sentence": sentence})


# ------------------------------------------------------------------ end to end, through Ray


def test_end_to_end_shards_and_rejects(ray_local, meshes, tmp_path):
    summary = run_recipe(recipe(meshes["path"]), tmp_path, progress=False)
    manifest = M.read_manifest(tmp_path)
    assert manifest["status"] == "complete" and summary.sentences == 2 * len(meshes["meshes"])
    rows = [row for shard in sorted(manifest["shards"]) for row in pq.read_table(tmp_path / shard).to_pylist()]
    for row in rows:
        meta = json.loads(row["meta"])
        assert row["task"] == "multiview" and row["num_images"] == 16 and len(row["tokens"]) == 16 * 256
        assert row["images"] == [view_key(meta["object"], c["view"]) for c in meta["cameras"]]
        assert meta["renderer"] == "osmesa"
    rejects = M.read_rejects(tmp_path).to_pylist()
    assert dict(Counter(r["reason"] for r in rejects)) == meshes["expected_rejects"]
    assert manifest["totals"]["inputs"] == 24 * len(meshes["meshes"]) + sum(meshes["expected_rejects"].values())
