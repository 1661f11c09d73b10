"""The laion reader on img2dataset-layout shards, as a plain list (no Ray): every member and every
status row ends as exactly one item (an image or a reject), keys as webdataset makes them."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from uvd.pipelines import laion as L
from uvd.pipelines.laion import LaionSource
from uvd.pipelines.laion_shards import split_key, tar_samples
from uvd import records as R
from uvd.records import TOO_LARGE
from uvd.recipe import recipe_from_dict


def source_for(inputs, **sections) -> LaionSource:
    return LaionSource(recipe_from_dict({"source": "laion", "inputs": inputs, **sections}))


def read_all(source: LaionSource, unit: str) -> tuple[list, Exception | None]:
    """Every item of a unit, and the unit-level error raised after them (None if none)."""
    items, error = [], None
    try:
        for item in source.read_unit(unit):
            items.append(item)
    except (OSError, ValueError) as err:
        error = err
    return items, error


def jpeg(seed: int, size=(80, 64)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG")
    return buf.getvalue()


def meta_json(key: str, **extra) -> bytes:
    return json.dumps({"url": f"https://x/{key}.jpg", "caption": f"cap {key}", "key": key, "status": "success", **extra}).encode()


def write_tar(path: Path, members: list) -> Path:
    """members: (name, bytes) for files, or (name, 'symlink'|'hardlink'|'fifo', target)."""
    with tarfile.open(path, "w") as tar:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if isinstance(member[1], bytes):
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[member[1]]
                info.linkname = member[2] if len(member) > 2 else ""
                tar.addfile(info)
    return path


def sample(key: str, seed: int, **extra) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg(seed)), (f"{key}.json", meta_json(key.rsplit("/", 1)[-1], **extra)), (f"{key}.txt", f"cap {key}".encode())]


def write_status(path: Path, rows: list[dict], columns=("key", "status", "error_message")) -> Path:
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path)
    return path


def by_key(items) -> dict:
    return {i.key: i for i in items}


# ----------------------------------------------------------------------------- the demo world


def test_reader_yields_every_sample_and_every_failed_download(world):
    info = world["laion"]
    source = source_for(info["path"])
    units = source.list_units()
    assert [Path(u).name for u in units] == sorted(p.name for p in Path(info["path"]).glob("*.tar"))
    items = [item for unit in units for item in source.read_unit(unit)]
    assert len(items) == info["items"]
    keys = [i.key for i in items]
    assert len(set(keys)) == len(keys) and all("/" in k and k.split("/")[0].endswith(".tar") for k in keys)
    failed = sorted(i.key for i in items if i.reject == R.DOWNLOAD_FAILED)
    assert failed == sorted(info["keys_by_reason"][R.DOWNLOAD_FAILED])
    # what the reader itself rejects (the decoder and the dedup do the rest)
    for reason in (L.UNSUPPORTED_MEMBER, L.DUPLICATE_KEY, L.UNKNOWN_STATUS, L.BAD_METADATA):
        assert sorted(i.key for i in items if i.reject == reason) == sorted(info["keys_by_reason"].get(reason, [])), reason
    good = [i for i in items if not i.reject]
    assert all(i.meta["url"] and i.meta["caption"] is not None for i in good)
    assert all("width" in i.meta and "sha256" in i.meta and "status" not in i.meta and "exif" not in i.meta for i in good)


def test_limit_per_unit(world):
    source = source_for(world["laion"]["path"])
    unit = source.list_units()[0]
    assert len(list(source.read_unit(unit, max_items=3))) == 3


# ----------------------------------------------------------------------------- webdataset's conventions


def test_key_split_is_webdatasets():
    from webdataset.tariterators import base_plus_ext

    names = [
        "000012.jpg", "a/000012.jpg", "a/b/000012.seg.png", "x.tar.gz", "noext", ".hidden", "a/.hidden.jpg",
        "dir/", "a.b/c.jpg", "a.b/c", "__key__.txt", "k.JPG", "a/b.c.d/e.f.g",
    ]
    for name in names:
        assert split_key(name) == base_plus_ext(name), name


def test_samples_equal_webdatasets_grouping_on_a_clean_tar(world):
    """Our streaming reader and webdataset's tar_file_iterator + group_by_keys agree on a clean shard."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    tar_path = sorted(Path(world["laion"]["path"]).glob("00001.tar"))[0]
    with open(tar_path, "rb") as f:
        files = [dict(d, __url__=str(tar_path)) for d in tar_file_iterator(f)]
    theirs = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in group_by_keys(files)}
    ours = {s.key: s.members for s in tar_samples(tar_path, 1 << 26)}
    assert ours == theirs and len(ours) > 5


def test_same_name_in_different_folders_are_different_keys(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("a/000001", 1) + sample("b/000001", 2) + sample("000001", 3))
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    assert [i.key for i in items] == ["00000.tar/a/000001", "00000.tar/b/000001", "00000.tar/000001"]
    assert len({i.data for i in items}) == 3 and not any(i.reject for i in items)


# ----------------------------------------------------------------------------- hostile members


def test_links_specials_and_nameless_members_are_rejects(tmp_path):
    members = (
        sample("000001", 1)
        + [("000002.jpg", "symlink", "000001.jpg"), ("000002.txt", b"cap")]
        + [("000003.jpg", "hardlink", "000001.jpg")]
        + [("000004.jpg", "fifo")]
        + [("README", b"not a sample"), (".DS_Store", b"junk"), ("__meta__", b"webdataset metadata")]
        + sample("000005", 5)
    )
    tar = write_tar(tmp_path / "00000.tar", members)
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    got = {i.key: i.reject for i in items}
    assert got == {
        "00000.tar/000001": "", "00000.tar/000002": L.UNSUPPORTED_MEMBER, "00000.tar/000003": L.UNSUPPORTED_MEMBER,
        "00000.tar/000004": L.UNSUPPORTED_MEMBER, "00000.tar/README": L.UNSUPPORTED_MEMBER,
        "00000.tar/.DS_Store": L.UNSUPPORTED_MEMBER, "00000.tar/000005": "",
    }
    details = by_key(items)
    assert "symbolic link" in details["00000.tar/000002"].detail and "hard link" in details["00000.tar/000003"].detail


def test_duplicate_key_second_occurrence_is_a_reject(tmp_path):
    members = sample("000001", 1) + sample("000002", 2) + sample("000001", 3) + [("000002.jpg", jpeg(4)), ("000002.jpg", jpeg(5))]
    tar = write_tar(tmp_path / "00000.tar", members)
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    assert [(i.key, i.reject) for i in items] == [
        ("00000.tar/000001", ""), ("00000.tar/000002", ""), ("00000.tar/000001#2", L.DUPLICATE_KEY),
        ("00000.tar/000002#2", L.DUPLICATE_KEY), ("00000.tar/000002#3", L.DUPLICATE_KEY),
    ]
    assert items[0].data == jpeg(1)  # the first occurrence wins


def test_json_member_null_list_or_invalid_is_bad_metadata_latin1_is_read(tmp_path):
    latin = json.dumps({"url": "https://x/caf\u00e9", "caption": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    members = (
        [("000001.jpg", jpeg(1)), ("000001.json", b"null")]
        + [("000002.jpg", jpeg(2)), ("000002.json", b"[1, 2]")]
        + [("000003.jpg", jpeg(3)), ("000003.json", b"{not json")]
        + [("000004.jpg", jpeg(4)), ("000004.json", latin)]
        + [("000005.jpg", jpeg(5))]  # no json at all: url unknown, still used
    )
    tar = write_tar(tmp_path / "00000.tar", members)
    items = by_key(read_all(source_for(str(tmp_path)), str(tar))[0])
    assert [items[f"00000.tar/00000{i}"].reject for i in (1, 2, 3)] == [L.BAD_METADATA] * 3
    assert "NoneType" in items["00000.tar/000001"].detail
    assert items["00000.tar/000004"].reject == "" and items["00000.tar/000004"].meta["url"] == "https://x/caf\u00e9"
    assert items["00000.tar/000004"].meta["metadata_encoding"] == "latin-1"
    assert items["00000.tar/000005"].reject == "" and items["00000.tar/000005"].meta["url"] is None


def test_status_table_statuses(tmp_path):
    members = sample("000001", 1) + sample("000002", 2) + sample("000003", 3) + sample("000009", 9)
    tar = write_tar(tmp_path / "00000.tar", members)
    write_status(tmp_path / "00000.parquet", [
        {"key": "000001", "status": "success"},
        {"key": "000002", "status": "weird_new_status"},  # unknown: rejected, image NOT used
        {"key": "000003", "status": "failed_to_resize", "error_message": "bad size"},
        {"key": "000004", "status": "failed_to_download", "error_message": "HTTP 404"},
        {"key": "000005", "status": "success"},  # listed, but no member in the tar
        {"key": "000006", "status": "gone"},
    ])
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    assert [(i.key.split("/")[1], i.reject) for i in items] == [
        ("000001", ""), ("000002", L.UNKNOWN_STATUS), ("000003", R.DOWNLOAD_FAILED), ("000009", ""),
        ("000004", R.DOWNLOAD_FAILED), ("000005", L.MISSING_IMAGE), ("000006", L.UNKNOWN_STATUS),
    ]
    assert all(i.data == b"" for i in items if i.reject)
    assert "HTTP 404" in items[4].detail


def test_status_table_without_status_column_counts_rows_as_successes(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("000001", 1) + sample("000002", 2))
    write_status(tmp_path / "00000.parquet", [{"key": "000001"}, {"key": "000002"}, {"key": "000003"}], columns=("key",))
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    assert [(i.key, i.reject) for i in items] == [
        ("00000.tar/000001", ""), ("00000.tar/000002", ""), ("00000.tar/000003", L.MISSING_IMAGE),
    ]


def test_unreadable_status_table_keeps_the_tar_items_and_reports_the_unit(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("000001", 1))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 this is not parquet")
    items, error = read_all(source_for(str(tmp_path / "00000.tar")), str(tar))
    assert [i.key for i in items] == ["00000.tar/000001"] and not items[0].reject
    assert isinstance(error, OSError) and "00000.parquet" in str(error)


# ----------------------------------------------------------------------------- broken tars


@pytest.fixture
def ten_sample_tar(tmp_path):
    members = [m for i in range(10) for m in sample(f"{i:06d}", i)]
    tar = write_tar(tmp_path / "00000.tar", members)
    write_status(tmp_path / "00000.parquet", [{"key": f"{i:06d}", "status": "success"} for i in range(10)])
    with tarfile.open(tar) as t:
        offsets = {m.name: (m.offset, m.offset_data, m.size) for m in t.getmembers()}
    return tar, offsets


@pytest.mark.parametrize("where", ["inside_data", "member_boundary", "inside_header", "end_marker"])
def test_cut_tar_keeps_what_it_read_and_accounts_for_the_rest(ten_sample_tar, where):
    tar, offsets = ten_sample_tar
    header, data, size = offsets["000004.json"]
    cut = {
        "inside_data": data + size // 2, "member_boundary": header, "inside_header": header + 100,
        "end_marker": offsets["000009.txt"][1] + 512,
    }[where]
    tar.write_bytes(tar.read_bytes()[:cut])
    items, error = read_all(source_for(str(tar.parent)), str(tar))
    assert isinstance(error, OSError) and "00000.tar" in str(error)
    keys = [i.key.split("/")[1] for i in items]
    assert sorted(keys) == [f"{i:06d}" for i in range(10)]  # every status row, once
    got = {i.key.split("/")[1]: i.reject for i in items}
    if where == "end_marker":  # the last sample may have lost members: it is the one being read
        assert all(got[f"{i:06d}"] == "" for i in range(9)) and got["000009"] == R.UNREADABLE
    else:
        assert all(got[f"{i:06d}"] == "" for i in range(4))
        assert all(got[f"{i:06d}"] == R.UNREADABLE for i in range(4, 10))
        assert "breaks inside this sample" in by_key(items)["00000.tar/000004"].detail


def test_cut_tar_without_status_table_rejects_the_sample_being_read(tmp_path):
    members = [m for i in range(4) for m in sample(f"{i:06d}", i)]
    tar = write_tar(tmp_path / "00000.tar", members)
    with tarfile.open(tar) as t:
        member = t.getmember("000002.json")
    tar.write_bytes(tar.read_bytes()[: member.offset_data + 5])
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert isinstance(error, OSError)
    assert [(i.key, i.reject) for i in items] == [
        ("00000.tar/000000", ""), ("00000.tar/000001", ""), ("00000.tar/000002", R.UNREADABLE),
    ]


def test_cut_inside_a_repeated_key_gives_it_its_own_reject(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("000001", 1) + sample("000001", 2))
    with tarfile.open(tar) as t:
        second = [m for m in t.getmembers() if m.name == "000001.json"][1]
    tar.write_bytes(tar.read_bytes()[: second.offset_data + 3])
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert isinstance(error, OSError)
    assert [(i.key, i.reject) for i in items] == [("00000.tar/000001", ""), ("00000.tar/000001#2", R.UNREADABLE)]


def test_data_after_the_end_of_archive_is_reported(tmp_path):
    first = write_tar(tmp_path / "a.tar", sample("000001", 1)).read_bytes()
    second = write_tar(tmp_path / "b.tar", sample("000002", 2)).read_bytes()
    (tmp_path / "a.tar").unlink(), (tmp_path / "b.tar").unlink()
    (tmp_path / "00000.tar").write_bytes(first + second)  # `cat a.tar b.tar`: tarfile stops after the first
    items, error = read_all(source_for(str(tmp_path)), str(tmp_path / "00000.tar"))
    assert [i.key for i in items] == ["00000.tar/000001"]
    assert isinstance(error, OSError) and "after the end-of-archive" in str(error)


# ----------------------------------------------------------------------------- size caps


def sparse_member_header(name: str, real_size: int, stored: int) -> bytes:
    """An old-GNU sparse member header: `real_size` bytes when extracted, `stored` bytes in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.type = stored, tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(stored, 12, tarfile.GNU_FORMAT)
    buf[482] = 0
    buf[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def test_huge_sparse_member_is_too_large_and_never_read(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sample("000001", 1):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = path.read_bytes()
    with tarfile.open(path) as t:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in t.getmembers())
    hostile = body[:end] + sparse_member_header("000002.jpg", 1 << 30, 512) + b"\1" * 512 + b"\0" * 1024
    path.write_bytes(hostile)
    assert path.stat().st_size < 12 * 1024
    with tarfile.open(path) as t:
        assert t.getmember("000002.jpg").size == 1 << 30  # tarfile would extract 1 GiB
    source = source_for(str(tmp_path))
    tracemalloc.start()
    items, error = read_all(source, str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert error is None and peak < 32 << 20
    assert [(i.key, i.reject) for i in items] == [("00000.tar/000001", ""), ("00000.tar/000002", TOO_LARGE)]
    assert "limits.max_member_bytes" in items[1].detail


def test_member_size_cap_comes_from_the_recipe(tmp_path):
    big = jpeg(1, size=(600, 400))
    tar = write_tar(tmp_path / "00000.tar", [("000001.jpg", big), ("000002.jpg", jpeg(2))])
    source = source_for(str(tmp_path), limits={"max_member_bytes": len(big) - 1})
    items, _ = read_all(source, str(tar))
    assert [i.reject for i in items] == [TOO_LARGE, ""]
    assert [i.reject for i in read_all(source_for(str(tmp_path)), str(tar))[0]] == ["", ""]
    with pytest.raises(ValueError, match="limits.max_member_bytes"):
        source_for(str(tmp_path), limits={"max_member_bytes": 0})


# ----------------------------------------------------------------------------- more input layouts


def test_tar_gz_shards_and_brace_lists(world, tmp_path):
    src = Path(world["laion"]["path"])
    for tar in sorted(src.glob("*.tar")):
        (tmp_path / f"{tar.stem}.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
        shutil.copy(tar.with_suffix(".parquet"), tmp_path / f"{tar.stem}.parquet")
    plain = source_for(str(src))
    expected = [(i.key.replace(".tar/", "/"), i.reject, i.data) for u in plain.list_units() for i in plain.read_unit(u)]
    braced = source_for(str(tmp_path / "{00000..00001}.tar.gz"))
    units = braced.list_units()
    assert [Path(u).name for u in units] == ["00000.tar.gz", "00001.tar.gz"]
    got = [(i.key.replace(".tar.gz/", "/"), i.reject, i.data) for u in units for i in braced.read_unit(u)]
    assert got == expected
    with pytest.raises(ValueError, match="matches nothing"):
        source_for(str(tmp_path / "{00000..00002}.tar.gz")).list_units()
    cut = tmp_path / "00000.tar.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    items, error = read_all(braced, str(cut))
    status_keys = set(pq.read_table(tmp_path / "00000.parquet").column("key").to_pylist())
    keys = [i.key.split("/", 1)[1] for i in items]
    assert isinstance(error, OSError) and len(set(keys)) == len(keys) and status_keys <= set(keys)  # each row once
    assert any(i.reject == R.UNREADABLE for i in items)


def _world_rows(world):
    """{key: (reject, image bytes, meta)} the tar reader gives for the demo world's shard 0."""
    source = source_for(world["laion"]["path"])
    unit = source.list_units()[0]
    return {i.key.split("/", 1)[1]: (i.reject, i.data, i.meta) for i in source.read_unit(unit)}


def test_img2dataset_parquet_output_format(tmp_path):
    rows = []
    for i in range(5):
        rows.append({"key": f"{i:09d}", "jpg": jpeg(i), "txt": f"cap {i}", "url": f"https://x/{i}", "caption": f"cap {i}",
                     "status": "success", "error_message": None, "punsafe": 0.01 * i})
    rows[2].update(jpg=None, status="failed_to_download", error_message="404")
    rows[3].update(status="odd")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    source = source_for(str(tmp_path))
    (unit,) = source.list_units()
    items, error = read_all(source, unit)
    assert error is None
    assert [(i.key, i.reject) for i in items] == [
        ("00000.parquet/000000000", ""), ("00000.parquet/000000001", ""), ("00000.parquet/000000002", R.DOWNLOAD_FAILED),
        ("00000.parquet/000000003", L.UNKNOWN_STATUS), ("00000.parquet/000000004", ""),
    ]
    assert items[4].data == jpeg(4) and items[4].meta["punsafe"] == 0.04 and items[4].meta["caption"] == "cap 4"


def test_img2dataset_files_output_format(tmp_path):
    shard = tmp_path / "00000"
    shard.mkdir()
    for i in range(3):
        for name, data in sample(f"{i:09d}", i):
            (shard / name).write_bytes(data)
    (shard / "000000003.jpg").symlink_to(shard / "000000000.jpg")
    write_status(tmp_path / "00000.parquet", [{"key": f"{i:09d}", "status": "success"} for i in range(4)]
                 + [{"key": "000000009", "status": "failed_to_download", "error_message": "timeout"}])
    source = source_for(str(tmp_path))
    assert [Path(u).name for u in source.list_units()] == ["00000"]
    items, error = read_all(source, str(shard))
    assert error is None
    assert [(i.key, i.reject) for i in items] == [
        ("00000/000000000", ""), ("00000/000000001", ""), ("00000/000000002", ""),
        ("00000/000000003", L.UNSUPPORTED_MEMBER), ("00000/000000009", R.DOWNLOAD_FAILED),
    ]
    assert items[1].data == jpeg(1) and items[1].meta["url"] == "https://x/000000001.jpg"


def test_empty_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\*\.tar"):
        source_for(str(tmp_path)).list_units()


# ----------------------------------------------------------------------------- metadata and its filters


def test_metadata_is_kept_and_filters_name_the_field(tmp_path):
    members = (
        sample("000001", 1, punsafe=0.01, pwatermark=0.1, similarity=0.35, width=80, height=64)
        + sample("000002", 2, punsafe=0.5, pwatermark=0.1, similarity=0.35)
        + sample("000003", 3, punsafe=0.01, pwatermark=0.9, similarity=0.35)
        + sample("000004", 4, punsafe=0.01, pwatermark=0.1, similarity=0.2)
        + sample("000005", 5, punsafe=None, pwatermark=0.1, similarity=0.35)
        + sample("000006", 6, pwatermark=0.1, similarity=0.35)
    )
    tar = write_tar(tmp_path / "00000.tar", members)
    filters = {"punsafe": {"max": 0.1}, "pwatermark": {"max": 0.8}, "similarity": {"min": 0.28}}
    items, _ = read_all(source_for(str(tmp_path), sentence={"meta_filters": filters}), str(tar))
    assert [i.reject for i in items] == ["", *[L.FILTERED_META] * 5]
    assert [i.detail.split("=")[0].split(":")[0] for i in items[1:]] == ["punsafe", "pwatermark", "similarity", "punsafe", "punsafe"]
    assert "above max 0.1" in items[1].detail and "below min 0.28" in items[3].detail
    meta = items[0].meta
    assert meta["punsafe"] == 0.01 and meta["similarity"] == 0.35 and meta["width"] == 80 and meta["url"]
    assert "status" not in meta and "key" not in meta
    unfiltered, _ = read_all(source_for(str(tmp_path)), str(tar))
    assert [i.reject for i in unfiltered] == [""] * 6
    lean, _ = read_all(source_for(str(tmp_path), sentence={"keep_metadata": False, "keep_caption": False}), str(tar))
    assert lean[0].meta == {"url": "https://x/000001.jpg"}


@pytest.mark.parametrize("bad, message", [
    ({"punsafe": {"maximum": 0.1}}, "meta_filters.punsafe"),
    ({"punsafe": {"min": 0.5, "max": 0.1}}, "above max"),
    ({"punsafe": {}}, "min and/or max"),
    ({"punsafe": 0.1}, "meta_filters.punsafe"),
])
def test_meta_filter_mistakes_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        source_for("x", sentence={"meta_filters": bad})


def test_every_member_of_a_hostile_tar_is_accounted_once(tmp_path):
    members = (
        sample("a/000001", 1) + sample("b/000001", 2)
        + [("000002.jpg", "symlink", "a/000001.jpg"), ("000003.jpg", "hardlink", "b/000001.jpg")]
        + sample("000004", 4) + sample("000004", 5)
        + [("000005.jpg", jpeg(5)), ("000005.json", b"null")]
        + [("000006.txt", b"caption without image")]
    )
    tar = write_tar(tmp_path / "00000.tar", members)
    items, error = read_all(source_for(str(tmp_path)), str(tar))
    assert error is None
    assert Counter(i.reject for i in items) == Counter({
        "": 3, L.UNSUPPORTED_MEMBER: 2, L.DUPLICATE_KEY: 1, L.BAD_METADATA: 1, L.MISSING_IMAGE: 1,
    })
    assert len({i.key for i in items}) == len(items) == 8


# ----------------------------------------------------------------------------- streamed shards (pipe:, http)


def _tar_items(source, unit):
    return [(i.key.split("/", 1)[1], i.reject, i.data) for i in read_all(source, unit)[0]]


def test_pipe_shards_stream_a_commands_output(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("000001", 1) + sample("a/000002", 2))
    (tmp_path / "00000.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    source = source_for([f"pipe:cat {tmp_path}/{{00000.tar,00000.tar.gz}}"])
    units = source.list_units()
    assert units == [f"pipe:cat {tmp_path}/00000.tar", f"pipe:cat {tmp_path}/00000.tar.gz"]
    expected = _tar_items(source_for(str(tar)), str(tar))
    assert [k for k, _, _ in expected] == ["000001", "a/000002"]
    for unit in units:
        items, error = read_all(source, unit)
        assert error is None and [(i.key.split("/", 1)[1], i.reject, i.data) for i in items] == expected
        assert items[0].key.startswith(Path(unit.split()[-1]).name + "/")
    assert len(list(source.read_unit(units[0], max_items=1))) == 1  # stops early: the command is killed


def test_failing_pipe_command_is_an_error_of_the_unit(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", sample("000001", 1) + sample("000002", 2))
    source = source_for(str(tmp_path))
    items, error = read_all(source, f"pipe:cat {tar}; exit 3")
    assert isinstance(error, OSError) and "status 3" in str(error)
    assert [(i.key, i.reject) for i in items] == [("00000.tar/000001", ""), ("00000.tar/000002", R.UNREADABLE)]
    items, error = read_all(source, f"pipe:cat {tmp_path}/missing/00000.tar")
    assert isinstance(error, OSError) and items == []
    with pytest.raises(ValueError, match="only tar shards"):
        source_for(["pipe:cat x.zip"]).list_units()


def test_http_shards_stream_from_a_url(world, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=world["laion"]["path"])
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00001}}.tar"
        source = source_for([url])
        units = source.list_units()
        assert len(units) == 2 and units[0].endswith("/00000.tar")
        local = Path(world["laion"]["path"]) / "00001.tar"
        got = _tar_items(source, units[1])
        # no status table beside a stream: the tar's samples only (failed downloads are not in the tar)
        assert got == [s for s in _tar_items(source_for(str(local)), str(local)) if s[1] != R.DOWNLOAD_FAILED]
        items, error = read_all(source, units[1].replace("00001.tar", "00009.tar"))
        assert isinstance(error, OSError) and "404" in str(error) and items == []
    finally:
        server.shutdown()
        server.server_close()
