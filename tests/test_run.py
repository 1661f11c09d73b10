"""End to end through Ray: the reject accounting, resume, and what the shards hold."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import TEST_OVERRIDES
from uvd import layout as L
from uvd import manifest as M
from uvd.recipe import load_recipe
from uvd.runner import JobFailed, run_recipe
from uvd.stats import compute_stats

RECIPES = Path(__file__).parents[1] / "recipes"


def laion_recipe(world, *extra):
    return load_recipe(RECIPES / "laion.yaml", [f"inputs={world['laion']['path']}", *TEST_OVERRIDES, *extra])


def read_all(out):
    manifest = M.read_manifest(out)
    tables = [pq.read_table(out / name) for name in sorted(manifest["shards"])]
    rows = [row for t in tables for row in t.to_pylist()]
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="module")
def laion_run(ray_local, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("laion")
    summary = run_recipe(laion_recipe(world, "output.keep_work=true"), out, progress=False)
    return out, summary


def test_every_input_is_a_sentence_or_a_reject(laion_run, world):
    out, summary = laion_run
    info = world["laion"]
    rows = read_all(out)
    rejects = M.read_rejects(out).to_pylist()
    assert len(rows) == info["good"] == summary.sentences
    assert len(rows) + len(rejects) == info["items"]
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r["key"])
    assert {k: len(v) for k, v in by_reason.items()} == info["expected_rejects"]
    for reason, keys in info["keys_by_reason"].items():
        assert sorted(by_reason[reason]) == sorted(keys), reason
    used = {key for row in rows.values() for key in row["images"]}
    assert used.isdisjoint(r["key"] for r in rejects)


def test_shard_rows_follow_the_contract(laion_run):
    out, _ = laion_run
    manifest = M.read_manifest(out)
    assert manifest["status"] == "complete" and manifest["schema_version"] == 2
    assert not manifest["tokenizer"]["trained"] and manifest["tokenizer"]["id"].startswith("test-")
    schema = pq.read_schema(out / sorted(manifest["shards"])[0])
    assert str(schema.field("tokens").type) == "list<element: uint16>"
    assert pq.ParquetFile(out / sorted(manifest["shards"])[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    for row in read_all(out).values():
        assert row["source"] == "laion" and row["task"] == "single" and row["num_images"] == 1
        assert len(row["tokens"]) == 256 and max(row["tokens"]) < 8192
        meta = json.loads(row["meta"])
        assert meta["image_sizes"][0][0] >= 64 and "caption" in meta
        assert meta["tokenizer"] == manifest["tokenizer"]["id"]
    for name, counts in manifest["shards"].items():
        assert pq.read_metadata(out / name).num_rows == counts["sentences"] <= 16
    assert (out / M.RECIPE_FILE).is_file()
    assert not list(out.rglob(".*.tmp"))
    for name, counts in manifest["shards"].items():  # the recorded size and checksum are the file's
        data = (out / name).read_bytes()
        assert len(data) == counts["bytes"] and hashlib.sha256(data).hexdigest() == counts["sha256"]


def test_same_image_same_tokens(laion_run, world):
    """Tokens depend only on the image: the pipeline's tokens equal a direct encode."""
    from uvd.tokenizer import ImageTokenizer
    from uvd.images import decode_image
    from uvd.recipe import FilterOptions, ImageOptions

    out, _ = laion_run
    row = next(iter(read_all(out).values()))
    tar_name, key = row["images"][0].split("/")
    import tarfile

    with tarfile.open(Path(world["laion"]["path"]) / tar_name) as tar:
        data = tar.extractfile(f"{key}.jpg").read()
    pixels, _, _ = decode_image(data, ImageOptions(), FilterOptions())
    tokens = ImageTokenizer("test", device="cpu").encode_pixels(pixels[None])[0]
    np.testing.assert_array_equal(np.array(row["tokens"], np.uint16), tokens)


def test_rerun_of_a_finished_job_adds_nothing(laion_run, world):
    out, _ = laion_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    summary = run_recipe(laion_recipe(world, "output.keep_work=true"), out, progress=False)
    assert summary.already_complete
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


def _interrupt(run, part: str, tokenized: bool) -> None:
    """Make `run` look killed before `part` was written (and, unless `tokenized`, before it was tokenized)."""
    record = json.loads((run / L.WRITES_DIR / f"{part}.json").read_text())
    for name in [*record["shards"], record["rejects"]["file"]]:
        (run / name).unlink()
    (run / L.WRITES_DIR / f"{part}.json").unlink()
    if not tokenized:
        for name in (f"{L.PARTS_DIR}/{part}.json", f"{L.WORK_DIR}/{part}.parquet", f"{L.WORK_DIR}/{part}.digests.parquet"):
            (run / name).unlink()
    M.write_manifest(run, {**M.read_manifest(run), "status": "running", "shards": {}})


@pytest.mark.parametrize("tokenized", [False, True])
def test_interrupted_job_resumes_to_the_same_sentences(laion_run, world, tmp_path, tokenized):
    """Killed after part 0 was written, with the last part tokenized or not: the rerun redoes only
    the missing part and gives byte-identical shards and the same rejects."""
    out, _ = laion_run
    expected = read_all(out)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    manifest = M.read_manifest(resumed)
    parts = sorted(p.stem for p in (resumed / L.WRITES_DIR).glob("*.json"))
    assert len(parts) >= 2
    _interrupt(resumed, parts[-1], tokenized)
    summary = run_recipe(laion_recipe(world), resumed, progress=False)
    assert summary.parts_tokenized == (0 if tokenized else 1) and summary.parts_written == 1
    got = read_all(resumed)
    assert got.keys() == expected.keys()
    assert all(got[i]["tokens"] == expected[i]["tokens"] for i in got)
    key = lambda r: (r["key"], r["reason"])  # noqa: E731
    assert sorted(M.read_rejects(resumed).to_pylist(), key=key) == sorted(M.read_rejects(out).to_pylist(), key=key)
    assert not (resumed / L.WORK_DIR).exists()
    for name in manifest["shards"]:  # byte-identical shards
        assert (resumed / name).read_bytes() == (out / name).read_bytes()


def test_other_recipe_into_the_same_folder_is_refused(laion_run, world):
    out, _ = laion_run
    with pytest.raises(ValueError, match="--overwrite"):
        run_recipe(laion_recipe(world, "filters.min_side=10"), out, progress=False)


def test_stats_match_the_shards(laion_run, world):
    out, summary = laion_run
    stats = compute_stats(out)
    assert stats["totals"] == {
        "sentences": summary.sentences,
        "images": summary.images,
        "tokens": 256 * summary.images,
        "rejected": sum(world["laion"]["expected_rejects"].values()),
    }
    assert stats["by_source"]["laion"]["token_share"] == 1.0
    assert stats["rejected_by_reason"] == world["laion"]["expected_rejects"]


def test_limit_reads_the_first_items(ray_local, world, tmp_path):
    summary = run_recipe(laion_recipe(world, "limits.max_items=5"), tmp_path, progress=False)
    m = M.read_manifest(tmp_path)
    assert m["totals"]["inputs"] == 5 and summary.sentences + summary.rejected == 5
    assert summary.parts_tokenized == 1


def test_too_many_rejects_fail_the_job(ray_local, world, tmp_path):
    with pytest.raises(JobFailed, match="max_reject_rate"):
        run_recipe(laion_recipe(world, "limits.max_reject_rate=0.01"), tmp_path, progress=False)
    assert M.read_manifest(tmp_path)["status"] == "failed"
    assert M.read_rejects(tmp_path).num_rows > 0


def test_imagenet_groups_end_to_end(ray_local, world, tmp_path):
    recipe = load_recipe(RECIPES / "imagenet_groups.yaml", [f"inputs={world['imagenet']['path']}", *TEST_OVERRIDES])
    summary = run_recipe(recipe, tmp_path, progress=False)
    rows = read_all(tmp_path)
    assert rows and all(r["num_images"] == 16 and len(r["tokens"]) == 16 * 256 for r in rows.values())
    assert {r["task"] for r in rows.values()} <= {"category_k2", "category_k4", "category_k8", "category_k16"}
    rejects = M.read_rejects(tmp_path).to_pylist()
    used = [k for r in rows.values() for k in r["images"]]
    assert len(used) == len(set(used))
    assert len(used) + len(rejects) == world["imagenet"]["items"] == summary.images + summary.rejected
    bad = {r["reason"] for r in rejects} - {"unused_remainder"}
    assert bad == set(world["imagenet"]["expected_rejects"])
