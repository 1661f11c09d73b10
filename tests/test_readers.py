"""Any Parquet reader loads the shards with no UVD code: pyarrow, DuckDB, HF datasets."""
import glob

import pyarrow.dataset as ds

from test_run import laion_run  # noqa: F401  (module fixture)


def test_pyarrow_dataset(laion_run):
    out, summary = laion_run
    table = ds.dataset(str(out), format="parquet", exclude_invalid_files=True).to_table()
    # the rejects file sits beside the shards with another schema: select the shards
    table = ds.dataset(sorted(glob.glob(f"{out}/laion-*.parquet")), format="parquet").to_table()
    assert table.num_rows == summary.sentences
    assert table.column("tokens").type.value_type.bit_width == 16


def test_duckdb(laion_run):
    import duckdb

    out, summary = laion_run
    con = duckdb.connect()
    n, tokens, lo, hi = con.execute(
        f"SELECT count(*), sum(len(tokens)), min(list_min(tokens)), max(list_max(tokens)) "
        f"FROM read_parquet('{out}/laion-*.parquet')"
    ).fetchone()
    assert n == summary.sentences and tokens == summary.tokens and 0 <= lo <= hi < 8192


def test_hf_datasets(laion_run, tmp_path):
    from datasets import load_dataset

    out, summary = laion_run
    dset = load_dataset(
        "parquet", data_files=sorted(glob.glob(f"{out}/laion-*.parquet")), split="train", cache_dir=str(tmp_path)
    )
    assert len(dset) == summary.sentences
    row = dset[0]
    assert len(row["tokens"]) == 256 * row["num_images"] and row["source"] == "laion"
