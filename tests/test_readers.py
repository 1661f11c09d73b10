"""Any Parquet reader loads the shards with no UVD code: pyarrow, DuckDB, HF datasets (a run
folder is a Hugging Face dataset: its card's configs name the shards and the rejects)."""

import pyarrow.dataset as ds
import pytest
import pyarrow.parquet as pq

from uvd import manifest as M

from test_run import laion_run  # noqa: F401  (module fixture)


def test_pyarrow_dataset(laion_run):
    out, summary = laion_run
    table = ds.dataset(str(out / "data"), format="parquet").to_table()  # the shards alone, in data/
    assert table.num_rows == summary.sentences
    assert table.column("tokens").type.value_type.bit_width == 16


def test_duckdb(laion_run):
    import duckdb

    out, summary = laion_run
    con = duckdb.connect()
    n, tokens, lo, hi = con.execute(
        f"SELECT count(*), sum(len(tokens)), min(list_min(tokens)), max(list_max(tokens)) "
        f"FROM read_parquet('{out}/data/*.parquet')"
    ).fetchone()
    assert n == summary.sentences and tokens == summary.tokens and 0 <= lo <= hi < 8192


def test_hf_datasets(laion_run, tmp_path):
    from datasets import load_dataset

    out, summary = laion_run
    dset = load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path))
    assert len(dset) == summary.sentences
    row = dset[0]
    assert len(row["tokens"]) == 256 * row["num_images"] and row["source"] == "laion"


def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_a_run_folder_is_a_hugging_face_dataset(laion_run, tmp_path, monkeypatch):
    """load_dataset(RUN_DIR), offline, reads the shards as-is through the card's `default` config
    and the rejects through `rejects`; rows equal what pyarrow reads from the manifest's shards."""
    from datasets import load_dataset

    _offline(monkeypatch)
    out, summary = laion_run
    assert (out / "README.md").read_text().startswith("---\nconfigs:")
    sentences = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "a"))
    shards = sorted(M.read_manifest(out)["shards"])
    expected = [row for name in shards for row in pq.read_table(out / name).to_pylist()]
    assert len(sentences) == summary.sentences == len(expected)
    got = {row["id"]: row for row in sentences}
    assert got.keys() == {row["id"] for row in expected}
    for row in expected:
        assert got[row["id"]]["tokens"] == row["tokens"] and got[row["id"]]["images"] == row["images"]
    assert sentences.features["tokens"].feature.dtype == "uint16"

    rejects = load_dataset(str(out), "rejects", split="train", cache_dir=str(tmp_path / "b"))
    expected_rejects = M.read_rejects(out)
    assert len(rejects) == expected_rejects.num_rows > 0
    assert sorted(rejects["reason"]) == sorted(expected_rejects.column("reason").to_pylist())


def test_shard_meta_carries_the_laion_metadata_of_its_own_image(laion_run, world):
    """End to end: each row's meta (read back with pyarrow) is the img2dataset metadata of the tar
    member its key names (folder keys included), and a photo stored on its side is turned upright."""
    import hashlib
    import json
    import tarfile
    from pathlib import Path

    out, summary = laion_run
    table = ds.dataset([str(out / name) for name in sorted(M.read_manifest(out)["shards"])], format="parquet").to_table()
    members = {}
    for tar_path in sorted(Path(world["laion"]["path"]).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:  # the first occurrence of a name, as the reader keeps it
                if info.isreg() and info.name.endswith(".jpg"):
                    members.setdefault(f"{tar_path.name}/{info.name[:-4]}", tar.extractfile(info).read())
    turned = 0
    for key, meta in zip(table.column("images").to_pylist(), table.column("meta").to_pylist()):
        meta, data = json.loads(meta), members[key[0]]
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["url"], key
        assert "status" not in meta
        if meta.get("exif_transposed"):
            turned += 1
            from PIL import Image
            import io

            stored = Image.open(io.BytesIO(data)).size
            assert meta["image_sizes"][0] == [stored[1], stored[0]] == [meta["width"], meta["height"]]
    assert turned == 1
    assert any("/a/" in k[0] for k in table.column("images").to_pylist())
