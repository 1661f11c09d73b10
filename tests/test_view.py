"""Looking at tokens: `uvd view` contact sheets of a shard's sentence and of an image's reconstruction,
and `uvd stats --codebook` code-usage numbers."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from uvd.tokenizer.encode import ImageTokenizer
from uvd.tokenizer.vqgan import PRESETS, build_vqgan, save_tokenizer
from uvd import manifest as M
from uvd.cli import main
from uvd.shards import write_shard
from uvd.stats import compute_stats, format_stats


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the runner leaves it: one shard of two sentences, a manifest naming the tokenizer."""
    run = tmp_path_factory.mktemp("view") / "laion"
    run.mkdir()
    tokenizer = ImageTokenizer("test", device="cpu")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    tokens = tokenizer.encode_pixels(pixels)  # (3, 256)
    rows = [
        {"id": "s0", "source": "laion", "task": "single", "num_images": 1, "tokens": tokens[0],
         "images": ["00000.tar/000000001"], "meta": "{}"},
        {"id": "s1", "source": "laion", "task": "pair", "num_images": 2, "tokens": tokens[1:].reshape(-1),
         "images": ["00000.tar/000000002", "00000.tar/000000003"], "meta": "{}"},
    ]
    (run / "data").mkdir()
    write_shard(rows, run / "data/laion-000000-000.parquet", 16, "zstd", 3)
    counts = {"sentences": 2, "images": 3, "tokens": 768, "by_task": {
        "single": {"sentences": 1, "images": 1, "tokens": 256}, "pair": {"sentences": 1, "images": 2, "tokens": 512}}}
    M.write_manifest(run, {"schema_version": 2, "source": "laion", "recipe_hash": "0", "status": "complete",
                           "tokenizer": tokenizer.info, "shards": {"data/laion-000000-000.parquet": counts}})
    return run


def test_view_shard_row_and_id(run_dir, tmp_path, capsys):
    shard = run_dir / "data/laion-000000-000.parquet"
    assert main(["view", str(shard), "--id", "s1", "--out", str(tmp_path / "s1.png")]) == 0
    assert "2 image(s) of laion/pair" in capsys.readouterr().out
    sheet = Image.open(tmp_path / "s1.png")
    assert sheet.width > 2 * 256 and sheet.height > 256  # two tiles side by side, with labels
    assert main(["view", str(shard), "--out", str(tmp_path / "s0.png")]) == 0  # row 0 by default
    assert "1 image(s) of laion/single" in capsys.readouterr().out
    assert main(["view", str(shard), "--row", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["view", str(shard), "--id", "nope", "--out", str(tmp_path / "x.png")]) == 2


def test_view_shard_decodes_with_the_run_tokenizer(run_dir, tmp_path):
    from uvd.tokenizer.view import LABEL_HEIGHT, view_shard

    path = tmp_path / "sheet.png"
    message = view_shard(run_dir / "data/laion-000000-000.parquet", path, row=1)
    assert "laion/pair" in message
    tokenizer = ImageTokenizer("test", device="cpu")
    import pyarrow.parquet as pq

    row = pq.read_table(run_dir / "data/laion-000000-000.parquet").slice(1, 1).to_pylist()[0]
    expected = tokenizer.decode_tokens(np.asarray(row["tokens"]).reshape(2, 256))
    sheet = np.asarray(Image.open(path))
    top = LABEL_HEIGHT // 2 + 8  # title line, then a 4 px margin
    tile = sheet[top:top + 256, 4:4 + 256]
    assert np.array_equal(tile, expected[0])


def test_view_image_reconstruction(tmp_path, capsys):
    weights = tmp_path / "tok"
    save_tokenizer(build_vqgan("test", seed=1), PRESETS["test"], weights)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "photo.png").write_bytes(buf.getvalue())
    out = tmp_path / "recon.png"
    assert main(["view", str(tmp_path / "photo.png"), "--weights", str(weights), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trained"] is True and report["psnr"] > 0
    assert Image.open(out).width > 2 * 256  # original | reconstruction
    assert main(["view", str(tmp_path / "photo.png"), "--row", "1", "--out", str(out)]) == 2


def test_stats_codebook(run_dir, capsys):
    stats = compute_stats(run_dir.parent, codebook=True)
    book = stats["by_source"]["laion"]["codebook"]
    assert book["tokens"] == 3 * 256 and book["codebook_size"] == 8192
    assert book["used_codes"] + book["dead_codes"] == 8192
    assert book["dead_share"] == pytest.approx(book["dead_codes"] / 8192)
    assert 1.0 <= book["perplexity"] <= book["used_codes"]
    assert stats["codebook"]["tokens"] == 3 * 256
    assert "codebook usage" in format_stats(stats)
    assert "codebook" not in compute_stats(run_dir.parent)
    assert main(["stats", str(run_dir.parent), "--codebook", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["codebook"]["used_codes"] == stats["codebook"]["used_codes"]


def test_view_wrong_targets_are_clear_errors(run_dir, tmp_path, capsys):
    """A missing file, an input tar and the rejects file are named for what they are (exit 2, no traceback)."""
    import pyarrow.parquet as pq

    from uvd.records import Reject
    from uvd.shards import rejects_table

    out = str(tmp_path / "x.png")
    assert main(["view", str(tmp_path / "missing.parquet"), "--out", out]) == 2
    assert "missing.parquet: no such file" in capsys.readouterr().err
    (tmp_path / "00000.tar").write_bytes(b"\0" * 1024)
    assert main(["view", str(tmp_path / "00000.tar"), "--out", out]) == 2
    assert "a tar shard holds input images, not tokens" in capsys.readouterr().err
    rejects = tmp_path / "_rejects.parquet"
    pq.write_table(rejects_table([Reject("k", "corrupt_image", "bad", "00000.tar")]), rejects)
    assert main(["view", str(rejects), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "the run's rejects" in err and "tokens" in err
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert main(["view", str(tmp_path / "fake.parquet"), "--out", out]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert main(["view", str(run_dir), "--out", out]) == 2
    assert "is a folder; give one token shard" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
