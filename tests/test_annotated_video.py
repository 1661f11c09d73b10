"""The `annotated_video` source: interleaved and grouped layouts, palette-rendered label maps,
rejects of missing and bad annotations; on plain lists without Ray, then once through Ray."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shipped_recipe
from uvd.pipelines.annotated_video import count_images, layout_images
from uvd.pipelines.render import PALETTE
from uvd import manifest as M
from uvd.recipe import recipe_from_dict
from uvd.runner import run_recipe
from plain_run import run_plain



@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from uvd.demo.world_media import build_annotated_video_world

    return build_annotated_video_world(tmp_path_factory.mktemp("annotated_video") / "world", seed=0)


def recipe(clips, *extra):
    return shipped_recipe("annotated_video", clips["path"], *extra)


def by_reason(rejects):
    out = {}
    for r in rejects:
        out.setdefault(r.reason, []).append(r.key)
    return {k: sorted(v) for k, v in out.items()}


def test_layouts():
    assert layout_images(["f1", "f2", "f3"], ["a1", "a2", "a3"], "interleaved") == ["f1", "a1", "f2", "a2", "f3", "a3"]
    assert layout_images(["f1", "f2", "f3"], ["a1", "a2", "a3"], "grouped") == ["f1", "f2", "f3", "a1", "a2", "a3"]


def test_every_item_is_in_a_sentence_or_rejected(clips):
    sentences, rejects, items, _ = run_plain(recipe(clips))
    assert len(items) == clips["items"]
    assert Counter(s.task for s in sentences) == {"segmentation_interleaved": clips["windows"], "segmentation_grouped": clips["windows"]}
    assert by_reason(rejects) == {k: sorted(v) for k, v in clips["keys_by_reason"].items()}
    # both layouts reuse the same tokenized images: 2 per pair, each used twice
    assert count_images(sentences) == {"distinct": 2 * clips["pairs"], "uses": 4 * clips["pairs"]}
    assert sorted(len(s.images) for s in sentences if s.task.endswith("grouped")) == [4, 10, 16, 16, 16]


def test_interleaved_and_grouped_order(clips):
    sentences, _, _, _ = run_plain(recipe(clips))
    pairs = {}
    for s in sentences:
        pairs.setdefault((s.meta["clip"], s.meta["window"]), {})[s.meta["layout"]] = s
    for (clip, window), both in pairs.items():
        inter, grouped = [im.key for im in both["interleaved"].images], [im.key for im in both["grouped"].images]
        n = len(inter) // 2
        assert inter[0::2] == grouped[:n] and inter[1::2] == grouped[n:]
        for f, a in zip(inter[0::2], inter[1::2]):
            assert "/frames/" in f and a.endswith("#segmentation")
            assert Path(f).stem == Path(a.split("#")[0]).stem  # each annotation sits with its own frame
        assert both["grouped"].meta["frames"] == sorted(both["grouped"].meta["frames"])
    b = pairs[("clip_b", 0)]["interleaved"].meta["frames"]
    assert b == [0, 1, 2, 3, 4, 6, 7, 8]  # frame 5 has no mask


def test_label_maps_use_the_shared_palette(clips):
    _, _, _, pixels = run_plain(recipe(clips))
    seg = pixels["clip_a/masks/000000.png#segmentation"]
    colors = {tuple(int(v) for v in c) for c in np.unique(seg.reshape(-1, 3), axis=0)}
    assert colors <= {tuple(int(v) for v in PALETTE[i]) for i in (0, 1, 2)} and len(colors) == 3


def test_min_frames_and_single_layout(clips):
    sentences, rejects, _, _ = run_plain(recipe(clips, "sentence.min_frames=3", "sentence.layouts=[grouped]"))
    assert Counter(s.task for s in sentences) == {"segmentation_grouped": clips["windows"] - 1}
    assert len(by_reason(rejects)["unused_remainder"]) == 4  # clip_b's last 2 pairs


@pytest.mark.parametrize(
    "sentence, field",
    [
        ({"layouts": ["stacked"]}, "sentence.layouts"),
        ({"frames_per_sentence": 9}, "sentence.frames_per_sentence"),
        ({"annotations": {}}, "sentence.annotations"),
        ({"min_frames": 0}, "sentence.min_frames"),
    ],
)
def test_bad_sentence_options_are_named(sentence, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        recipe_from_dict({"source": "annotated_video", "inputs": "/tmp", "sentence": sentence})


# ------------------------------------------------------------------ end to end, through Ray


def test_end_to_end_shards_and_rejects(ray_local, clips, tmp_path):
    summary = run_recipe(recipe(clips), tmp_path, progress=False)
    manifest = M.read_manifest(tmp_path)
    assert manifest["status"] == "complete" and summary.sentences == 2 * clips["windows"]
    rows = [row for shard in sorted(manifest["shards"]) for row in pq.read_table(tmp_path / shard).to_pylist()]
    assert Counter(row["task"] for row in rows) == {"segmentation_interleaved": 5, "segmentation_grouped": 5}
    for row in rows:
        meta = json.loads(row["meta"])
        assert len(row["tokens"]) == 256 * row["num_images"] == 512 * len(meta["frames"])
    rejects = M.read_rejects(tmp_path).to_pylist()
    assert dict(Counter(r["reason"] for r in rejects)) == clips["expected_rejects"]
    assert len({key for row in rows for key in row["images"]}) == 2 * clips["pairs"]
