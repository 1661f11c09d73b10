"""The laion reader on img2dataset-layout shards, as a plain list (no Ray)."""
from pathlib import Path

from pipelines.laion import LaionSource
from uvd import records as R
from uvd.recipe import recipe_from_dict


def test_reader_yields_every_sample_and_every_failed_download(world):
    info = world["laion"]
    source = LaionSource(recipe_from_dict({"source": "laion", "inputs": info["path"]}))
    units = source.list_units()
    assert [Path(u).name for u in units] == sorted(p.name for p in Path(info["path"]).glob("*.tar"))
    items = [item for unit in units for item in source.read_unit(unit)]
    assert len(items) == info["items"]
    keys = [i.key for i in items]
    assert len(set(keys)) == len(keys) and all("/" in k and k.split("/")[0].endswith(".tar") for k in keys)
    failed = sorted(i.key for i in items if i.reject == R.DOWNLOAD_FAILED)
    assert failed == sorted(info["keys_by_reason"][R.DOWNLOAD_FAILED])
    good = [i for i in items if not i.reject]
    assert all(i.meta["url"] and i.meta["caption"] is not None for i in good)


def test_limit_per_unit(world):
    source = LaionSource(recipe_from_dict({"source": "laion", "inputs": world["laion"]["path"]}))
    unit = source.list_units()[0]
    assert len(list(source.read_unit(unit, max_items=3))) == 3


def test_cut_tar_is_an_error_of_the_unit(tmp_path, world):
    import pytest

    src = sorted(Path(world["laion"]["path"]).glob("*.tar"))[0]
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2 + 100])
    source = LaionSource(recipe_from_dict({"source": "laion", "inputs": str(tmp_path)}))
    with pytest.raises(OSError):
        list(source.read_unit(str(cut)))
