"""The `video` source: window plans per stride, decode-once accounting, rejects of broken files;
on plain lists without Ray, then once end to end through Ray."""
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shipped_recipe
from uvd.pipelines.video import VideoOptions, decode_accounting, frame_key, plan_windows
from uvd import manifest as M
from uvd.recipe import recipe_from_dict
from uvd.records import ImageRecord
from uvd.registry import get_source
from uvd.runner import run_recipe
from plain_run import run_plain

# Sentences the default recipe makes of the world's good clips (see demo/world_media.py).
EXPECTED_TASKS = {"video_s10": 3 + 2 + 1, "video_s20": 1 + 1, "video_s30": 1}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from uvd.demo.world_media import build_video_world

    return build_video_world(tmp_path_factory.mktemp("videos") / "world", seed=0)


def recipe(videos, *extra):
    return shipped_recipe("video", videos["path"], *extra)


def test_frame_indices_per_stride_are_exact():
    plan = plan_windows(480, VideoOptions())
    assert plan[10] == [list(range(0, 151, 10)), list(range(160, 311, 10)), list(range(320, 471, 10))]
    assert plan[20] == [list(range(0, 301, 20))]
    assert plan[30] == [list(range(0, 451, 30))]
    shifted = plan_windows(480, VideoOptions(strides=[20], start_frame=5, window_step=100, max_windows=None))
    assert shifted[20] == [list(range(5, 306, 20)), list(range(105, 406, 20))]
    assert len(plan_windows(10_000, VideoOptions())[10]) == 4  # max_windows


def test_no_partial_windows():
    options = VideoOptions()
    assert plan_windows(150, options) == {10: [], 20: [], 30: []}  # stride 10 needs 151 frames
    assert plan_windows(151, options)[10] == [list(range(0, 151, 10))]
    assert plan_windows(451, options)[30] and not plan_windows(450, options)[30]
    for num_frames in (151, 300, 451, 1000):
        for windows in plan_windows(num_frames, options).values():
            assert all(len(w) == 16 and w[-1] < num_frames for w in windows)


def test_every_video_is_in_sentences_or_rejected_for_its_reason(videos):
    sentences, rejects, _, _ = run_plain(recipe(videos))
    assert Counter(s.task for s in sentences) == EXPECTED_TASKS
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r.reason, []).append(r.key)
    assert {k: sorted(v) for k, v in by_reason.items()} == videos["keys_by_reason"]
    for s in sentences:
        meta = s.meta
        assert len(s.images) == 16 and s.task == f"video_s{meta['stride']}"
        assert meta["frame_indices"] == [meta["start_frame"] + i * meta["stride"] for i in range(16)]
        assert [im.key for im in s.images] == [frame_key(meta["video"], f) for f in meta["frame_indices"]]
        assert meta["frame_indices"][-1] < videos["videos"][meta["video"]]


def test_each_frame_is_decoded_once_across_strides(videos):
    sentences, _, items, _ = run_plain(recipe(videos))
    frames = [i for i in items if not i.reject]
    assert len({i.key for i in frames}) == len(frames)  # no frame is read twice
    long = [i for i in frames if i.meta["video"] == "clips/long.mp4"]
    long_sentences = [s for s in sentences if s.meta["video"] == "clips/long.mp4"]
    # stride-10 windows cover multiples of 10 up to 470; the stride-20 and -30 windows reuse them.
    assert sorted(i.meta["frame"] for i in long) == list(range(0, 471, 10))
    images = [ImageRecord(i.key, None, "", 0, 0) for i in long]
    assert decode_accounting(images, long_sentences) == {"decoded": 48, "uses": 80}
    used = {im.key for s in sentences for im in s.images}
    assert used == {i.key for i in frames}  # nothing decoded that no sentence uses


def test_frames_move_and_decoders_agree(videos):
    _, _, _, decord_px = run_plain(recipe(videos, "sentence.decoder=decord"))
    sentences, _, items, pyav_px = run_plain(recipe(videos, "sentence.decoder=pyav"))
    assert {i.meta["decoder"] for i in items if not i.reject} == {"pyav"}
    assert decord_px.keys() == pyav_px.keys()
    for key in decord_px:
        assert np.abs(decord_px[key].astype(int) - pyav_px[key].astype(int)).mean() < 3, key
    a, b = pyav_px[frame_key("clips/long.mp4", 0)], pyav_px[frame_key("clips/long.mp4", 10)]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # content moves between sampled frames


def test_truncated_file_falls_back_to_pyav_and_yields_no_orphan_frames(videos):
    source = get_source("video")(recipe(videos))
    unit = next(u for u in source.list_units() if u.endswith("truncated.mp4"))
    items = list(source.read_unit(unit))
    assert [(i.key, i.reject) for i in items] == [("broken/truncated.mp4", "truncated_video")]
    assert "pyav stopped" in items[0].detail and "1 of 1 windows lost" in items[0].detail


def test_downscale_and_limits(videos):
    source = get_source("video")(recipe(videos, "sentence.decode_short_side=256", "sentence.strides=[10]"))
    unit = next(u for u in source.list_units() if u.endswith("long.mp4"))
    items = list(source.read_unit(unit, max_items=5))
    assert len(items) == 5 and items[0].array.shape == (120, 160, 3)  # never enlarged


@pytest.mark.parametrize(
    "sentence, field",
    [
        ({"strides": [10, 10]}, "sentence.strides"),
        ({"frames_per_sentence": 17}, "sentence.frames_per_sentence"),
        ({"decoder": "opencv"}, "sentence.decoder"),
        ({"max_windows": 0}, "sentence.max_windows"),
        ({"decode_short_side": 128}, "sentence.decode_short_side"),
    ],
)
def test_bad_sentence_options_are_named(sentence, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        recipe_from_dict({"source": "video", "inputs": "/tmp", "sentence": sentence})


# ------------------------------------------------------------------ end to end, through Ray


@pytest.fixture(scope="module")
def video_run(ray_local, videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_run")
    return out, run_recipe(recipe(videos), out, progress=False)


def test_end_to_end_shards_and_rejects(video_run, videos):
    out, summary = video_run
    manifest = M.read_manifest(out)
    assert manifest["status"] == "complete"
    rows = [row for shard in sorted(manifest["shards"]) for row in pq.read_table(out / shard).to_pylist()]
    assert Counter(row["task"] for row in rows) == EXPECTED_TASKS
    for row in rows:
        meta = json.loads(row["meta"])
        assert row["source"] == "video" and row["num_images"] == 16 and len(row["tokens"]) == 16 * 256
        assert row["images"] == [frame_key(meta["video"], f) for f in meta["frame_indices"]]
    rejects = M.read_rejects(out).to_pylist()
    assert dict(Counter(r["reason"] for r in rejects)) == videos["expected_rejects"]
    # decode once: 48 + 32 + 16 distinct frames tokenized, 9 sentences x 16 = 144 frame uses
    assert manifest["totals"]["inputs"] == 48 + 32 + 16 + sum(videos["expected_rejects"].values())
    assert sum(row["num_images"] for row in rows) == 144
