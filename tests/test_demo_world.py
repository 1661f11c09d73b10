"""The demo world is written in the real formats (img2dataset shards, ImageNet tree), its
manifest matches what is on disk, and its broken inputs fail in PIL the way they are labelled."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings

import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from uvd.demo.world import IMAGENET_CLASSES, build_demo_world, build_imagenet_world, build_laion_world

REASONS = {
    "download_failed", "empty_file", "not_an_image", "truncated_image",
    "corrupt_image", "too_small", "bad_aspect", "duplicate",
}
HOSTILE_REASONS = {"unsupported_member", "duplicate_key", "unknown_status", "bad_metadata"}
LAION_COLUMNS = [
    "caption", "url", "key", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "sha256",
]


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def laion_files(root) -> dict[str, bytes]:
    """'00000.tar/000000012' -> the sample's jpg bytes, for every sample of every shard."""
    files = {}
    for tar_path in sorted(root.glob("*.tar")):
        for name, data in read_tar(tar_path).items():
            if name.endswith(".jpg"):
                files[f"{tar_path.name}/{name[:-4]}"] = data
    return files


def decode(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft("RGB", draft)
        img.load()
    return img


def digest_tree(root) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion")
    return root, build_laion_world(root, num_shards=2, images_per_shard=14, seed=3)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, build_imagenet_world(root, num_classes=5, images_per_class=7, seed=3)


def test_laion_files_are_img2dataset_webdataset_shards(laion):
    root, _ = laion
    assert sorted(p.name for p in root.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json",
    ]
    for shard in (0, 1):
        table = pq.read_table(root / f"{shard:05d}.parquet")
        assert table.column_names == LAION_COLUMNS
        assert table.num_rows == 14
        assert str(table.schema.field("width").type) == "int32"
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [f"{shard:05d}{i:04d}" for i in range(14)]
        members = read_tar(root / f"{shard:05d}.tar")
        names = list(members)
        success = [r for r in rows if r["status"] == "success"]
        expected = [f"{r['key']}.{ext}" for r in success for ext in ("jpg", "json", "txt")]
        assert names == expected  # key order, webdataset's sorted extensions, nothing for failed rows
        for row in success:
            meta = json.loads(members[f"{row['key']}.json"])
            assert list(meta) == LAION_COLUMNS and meta == row
            assert members[f"{row['key']}.txt"].decode() == row["caption"]
            assert hashlib.sha256(members[f"{row['key']}.jpg"]).hexdigest() == row["sha256"]
        for row in rows:
            if row["status"] != "success":
                assert row["status"] == "failed_to_download" and row["error_message"]
                assert row["sha256"] is None and row["width"] is None
        with tarfile.open(root / f"{shard:05d}.tar") as tar:
            assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}
        stats = json.loads((root / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == 14 and stats["successes"] == len(success)
        assert stats["failed_to_download"] == 14 - len(success)
        assert sum(stats["status_dict"].values()) == 14


def test_laion_manifest_matches_disk(laion):
    root, manifest = laion
    rows = [r for p in sorted(root.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert manifest["path"] == str(root)
    assert manifest["items"] == len(rows) == 28
    assert set(manifest["expected_rejects"]) == REASONS
    assert manifest["expected_rejects"] == {
        "download_failed": 2, "empty_file": 1, "not_an_image": 1, "truncated_image": 1,
        "corrupt_image": 1, "too_small": 1, "bad_aspect": 1, "duplicate": 2,
    }
    assert {r: len(k) for r, k in manifest["keys_by_reason"].items()} == manifest["expected_rejects"]
    assert manifest["good"] == manifest["items"] - sum(manifest["expected_rejects"].values()) == 18
    rejected = [key for keys in manifest["keys_by_reason"].values() for key in keys]
    assert len(set(rejected)) == len(rejected)
    files = laion_files(root)
    failed = {f"{r['key'][:5]}.tar/{r['key']}" for r in rows if r["status"] == "failed_to_download"}
    assert failed == set(manifest["keys_by_reason"]["download_failed"])
    assert set(files) | failed == {f"{r['key'][:5]}.tar/{r['key']}" for r in rows}
    # spread over both shards, one duplicate across shards
    assert {key[:9] for key in rejected} == {"00000.tar", "00001.tar"}


def test_laion_broken_inputs_behave_as_labelled_in_pil(laion):
    root, manifest = laion
    files = laion_files(root)
    by_reason = manifest["keys_by_reason"]
    for key in by_reason["empty_file"]:
        assert files[key] == b""
    for key in by_reason["not_an_image"]:
        with pytest.raises(UnidentifiedImageError):
            decode(files[key])
    for key in by_reason["truncated_image"]:
        for draft in (None, (64, 64)):  # the pipeline decodes with JPEG draft scaling
            with pytest.raises(OSError, match="truncated"):
                decode(files[key], draft)
    for key in by_reason["corrupt_image"]:
        Image.open(io.BytesIO(files[key]))  # the header is intact
        for draft in (None, (64, 64)):
            with pytest.raises((OSError, ValueError, SyntaxError)) as err:
                decode(files[key], draft)
            assert "truncated" not in str(err.value)
    for key in by_reason["too_small"]:
        assert min(decode(files[key]).size) < 64
    for key in by_reason["bad_aspect"]:
        width, height = decode(files[key]).size
        assert max(width, height) / min(width, height) > 3.0 and min(width, height) >= 64
    rejected = {key for keys in by_reason.values() for key in keys}
    good = [key for key in files if key not in rejected]
    assert len(good) == manifest["good"]
    for key in good:
        width, height = decode(files[key]).size
        assert min(width, height) >= 64 and max(width, height) / min(width, height) <= 2.5
    good_hashes = {hashlib.sha256(files[key]).hexdigest(): key for key in good}
    assert len(good_hashes) == len(good)  # no accidental duplicates among good images
    for key in by_reason["duplicate"]:
        original = good_hashes[hashlib.sha256(files[key]).hexdigest()]
        assert original < key  # the later key in (shard, key) order is the duplicate
    assert {key[:9] != good_hashes[hashlib.sha256(files[key]).hexdigest()][:9] for key in by_reason["duplicate"]} == {
        True, False,
    }


def test_imagenet_layout_and_manifest(imagenet):
    root, manifest = imagenet
    wnids = [wnid for wnid, _, _ in IMAGENET_CLASSES[:5]]
    assert sorted(p.name for p in root.iterdir()) == sorted(wnids)
    assert list(manifest["classes"]) == wnids
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for key in files:
        wnid = key.split("/")[0]
        assert re.fullmatch(rf"{wnid}/{wnid}_\d+\.JPEG", key)
    assert manifest["items"] == len(files) == 5 * 7 + 2
    assert manifest["good"] == 35
    assert manifest["expected_rejects"] == {"empty_file": 1, "not_an_image": 1}
    (empty,) = manifest["keys_by_reason"]["empty_file"]
    (not_image,) = manifest["keys_by_reason"]["not_an_image"]
    assert files[empty] == b""
    with pytest.raises(UnidentifiedImageError):
        decode(files[not_image])
    for wnid in wnids:
        good = [k for k in files if k.startswith(wnid + "/") and k not in (empty, not_image)]
        assert len(good) == 7
        for key in good:
            width, height = decode(files[key]).size
            assert min(width, height) >= 64 and max(width, height) / min(width, height) <= 2.5
    assert len({hashlib.sha256(d).hexdigest() for d in files.values()}) == len(files)


def test_same_seed_gives_byte_identical_worlds(tmp_path):
    first = build_demo_world(tmp_path / "a", seed=7, small=True)
    second = build_demo_world(tmp_path / "b", seed=7, small=True)
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    relative = [json.dumps(m).replace(str(tmp_path / name), "ROOT") for m, name in ((first, "a"), (second, "b"))]
    assert relative[0] == relative[1]
    build_demo_world(tmp_path / "c", seed=8, small=True)
    assert digest_tree(tmp_path / "a") != digest_tree(tmp_path / "c")


def test_demo_world_manifest_points_at_files(tmp_path):
    manifest = build_demo_world(tmp_path / "demo", small=True)
    root = tmp_path / "demo"
    assert sorted(p.name for p in root.iterdir()) == ["imagenet", "laion"]
    assert manifest["items"] == manifest["laion"]["items"] + manifest["imagenet"]["items"]
    assert manifest["good"] == manifest["laion"]["good"] + manifest["imagenet"]["good"]
    assert manifest["good"] + sum(manifest["expected_rejects"].values()) == manifest["items"]
    assert set(manifest["expected_rejects"]) == REASONS | HOSTILE_REASONS  # the demo world adds the hostile tar members
    laion = laion_files(root / "laion")
    for reason, keys in manifest["keys_by_reason"].items():
        assert len(keys) == manifest["expected_rejects"][reason]
        for key in keys:
            world, rest = key.split("/", 1)
            if world == "imagenet":
                assert (root / key).is_file()
            elif reason != "download_failed":
                assert rest.split("#")[0] in laion
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 10_000_000


def test_clean_world_has_no_rejects(tmp_path):
    manifest = build_laion_world(tmp_path / "l", num_shards=1, images_per_shard=3, broken=False)
    assert manifest["items"] == manifest["good"] == 3 and manifest["expected_rejects"] == {}
    manifest = build_imagenet_world(tmp_path / "i", num_classes=2, images_per_class=2, broken=False)
    assert manifest["items"] == manifest["good"] == 4 and manifest["keys_by_reason"] == {}


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="images_per_shard"):
        build_laion_world(tmp_path / "few", num_shards=1, images_per_shard=5)
    with pytest.raises(ValueError, match="num_classes"):
        build_imagenet_world(tmp_path / "many", num_classes=len(IMAGENET_CLASSES) + 1)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_laion_world(tmp_path / "used")


def _reason_codes() -> dict[str, str]:
    """Every registered reject reason (uvd.records.REASONS) -> the constant that holds it."""
    import importlib
    import pkgutil

    import uvd.pipelines as pipelines
    from uvd import records as R

    modules = [R, *(importlib.import_module(f"uvd.pipelines.{m.name}") for m in pkgutil.iter_modules(pipelines.__path__) if not m.ispkg)]
    codes = {}
    for module in modules:
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str) and value in R.REASONS:
                codes.setdefault(value, f"{module.__name__.rpartition('.')[2]}.{name}")
    assert set(codes) == set(R.REASONS)  # each code has a constant to import
    return codes


def test_demo_imports_reject_codes_instead_of_spelling_them():
    """The sample world names each planted failure by the pipelines' own constant, so a renamed code cannot drift."""
    import ast
    from pathlib import Path

    codes = _reason_codes()
    assert {"corrupt_video", "broken_mesh", "bad_box", "missing_image", "download_failed"} <= set(codes)
    spelled = []
    for path in sorted((Path(__file__).resolve().parents[1] / "demo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in codes:
                spelled.append(f"{path.name}:{node.lineno} {node.value!r} (use {codes[node.value]})")
    assert spelled == []


def test_demo_runs_every_shipped_recipe_with_the_bundled_tokenizer():
    from uvd.demo.run import DEMO_JOBS, demo_overrides
    from uvd.config import recipes_dir

    assert sorted(name for name, _ in DEMO_JOBS) == sorted(p.name for p in recipes_dir().glob("*.yaml"))
    weights = next(o for o in demo_overrides(small=False) if o.startswith("tokenizer.weights="))
    from pathlib import Path

    folder = Path(weights.split("=", 1)[1])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "limits.max_reject_rate=0.5" in demo_overrides(small=True)
