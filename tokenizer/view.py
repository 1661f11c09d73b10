"""Look at tokens: decode one sentence of a shard to a contact sheet, or show an image beside its
reconstruction through the tokenizer -- the check to make before training on a dataset.

    uvd view out/laion/laion-00000.parquet --row 3 --out sentence.png     # the run's own tokenizer
    uvd view photo.jpg --weights tokenizer/weights/demo-small --out recon.png
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from uvd.tokenizer.checkpoints import demo_weights_dir

LABEL_HEIGHT = 30
MAX_COLUMNS = 8


def _stage():
    from uvd.tokenizer.encode import ImageTokenizer

    return ImageTokenizer


def contact_sheet(images: np.ndarray, labels: list[list[str]], title: str = "", columns: int | None = None) -> Image.Image:
    """(N, H, W, 3) uint8 tiles, each with up to two label lines under it, in a grid; `title` on top."""
    num, height, width = images.shape[:3]
    columns = columns or min(MAX_COLUMNS, max(num, 1))
    rows = max(1, -(-num // columns))
    top = LABEL_HEIGHT // 2 + 4 if title else 0
    sheet_width = max(columns * (width + 4) + 4, 6 * len(title) + 8)  # the default font is ~6 px a character
    sheet = Image.new("RGB", (sheet_width, top + rows * (height + LABEL_HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black")
    for i in range(num):
        x = 4 + (i % columns) * (width + 4)
        y = top + 4 + (i // columns) * (height + LABEL_HEIGHT + 4)
        sheet.paste(Image.fromarray(images[i]), (x, y))
        for line_no, line in enumerate(labels[i][:2]):
            draw.text((x + 2, y + height + 2 + 13 * line_no), line[: width // 6], fill="black")
    return sheet


def _select_row(table, path: Path, row: int | None, sentence_id: str | None) -> dict:
    if row is not None and sentence_id is not None:
        raise ValueError("give --row or --id, not both")
    if sentence_id is not None:
        ids = table.column("id").to_pylist()
        if sentence_id not in ids:
            raise ValueError(f"{path}: no sentence with id {sentence_id!r}")
        row = ids.index(sentence_id)
    row = row or 0
    if not 0 <= row < table.num_rows:
        raise ValueError(f"{path}: --row {row} is outside [0, {table.num_rows})")
    return table.slice(row, 1).to_pylist()[0] | {"row": row}


def _run_tokenizer(shard: Path):
    """The tokenizer that wrote the shard, from its run's manifest and recipe (found in the
    shard's folder or a folder above it, so a run may keep its shards in a subfolder)."""
    from uvd.tokenizer.runs import load_run_tokenizer
    from uvd import manifest as M

    for folder in list(shard.resolve().parents)[:3]:
        if M.read_manifest(folder) is not None:
            return load_run_tokenizer(folder)
    raise ValueError(f"{shard.parent} has no run manifest naming its tokenizer; give --weights")


SHARD_COLUMNS = ["id", "source", "task", "num_images", "tokens", "images"]


def _read_shard(shard: Path):
    """A token shard's table; anything else is a clear error naming what it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not shard.is_file():
        raise ValueError(f"{shard}: no such file")
    try:
        schema = pq.read_schema(shard)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{shard}: not a Parquet file ({err})") from None
    missing = [c for c in SHARD_COLUMNS if c not in schema.names]
    if missing:
        what = "the run's rejects (no tokens to decode; read it with any Parquet reader)" if "reason" in schema.names \
            else "not a UVD token shard"
        raise ValueError(f"{shard}: {what}: it has no {', '.join(missing)} column(s)")
    return pq.read_table(shard, columns=SHARD_COLUMNS)


def view_shard(shard: str | Path, out: str | Path, row: int | None = None, sentence_id: str | None = None,
               weights: str | None = None) -> str:
    shard = Path(shard)
    table = _read_shard(shard)
    sentence = _select_row(table, shard, row, sentence_id)
    tokenizer = _stage()(None, weights=weights, device="cpu") if weights else _run_tokenizer(shard)
    per_image = tokenizer.config.tokens_per_image
    tokens = np.asarray(sentence["tokens"], dtype=np.int64)
    if tokens.size % per_image:
        raise ValueError(f"{shard} row {sentence['row']}: {tokens.size} tokens is not a multiple of {per_image}")
    pixels = tokenizer.decode_tokens(tokens.reshape(-1, per_image))  # (N, H, W, 3)
    labels = [[f"{sentence['source']}/{sentence['task']} #{i}", str(name)] for i, name in enumerate(sentence["images"])]
    note = "" if tokenizer.info["trained"] else "  [UNTRAINED tokenizer: pictures are noise]"
    title = f"{shard.name} row {sentence['row']}  id {sentence['id']}  tokenizer {tokenizer.info['id']}{note}"
    contact_sheet(pixels, labels, title).save(out)
    return f"{sentence['num_images']} image(s) of {sentence['source']}/{sentence['task']} -> {out}"


def view_image(image_path: str | Path, out: str | Path, weights: str | None = None, config: str | None = None) -> str:
    from uvd.images import decode_image
    from uvd.recipe import FilterOptions, ImageOptions

    path = Path(image_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if weights is None and config is None and (demo_weights_dir() / "config.json").is_file():
        weights = str(demo_weights_dir())
    stage = _stage()
    tokenizer = stage(None, weights=weights, device="cpu") if weights else stage(config or "small", device="cpu")
    size = tokenizer.config.resolution
    pixels = decode_image(path.read_bytes(), ImageOptions(size=size), FilterOptions())[0]
    tokens = tokenizer.encode_pixels(pixels[None])
    recon = tokenizer.decode_tokens(tokens)[0]
    mse = float(np.mean((recon.astype(np.float64) - pixels.astype(np.float64)) ** 2))
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    used = len(np.unique(tokens))
    note = "" if tokenizer.info["trained"] else " [UNTRAINED]"
    labels = [["original", path.name[:40]], [f"reconstruction {psnr:.1f} dB", f"{used} distinct codes"]]
    contact_sheet(np.stack([pixels, recon]), labels, f"tokenizer {tokenizer.info['id']}{note}").save(out)
    return json.dumps({"image": str(path), "out": str(out), "psnr": round(psnr, 2), "distinct_codes": used,
                       "tokenizer": tokenizer.info["id"], "trained": tokenizer.info["trained"]})


def view(target: str | Path, out: str | Path, row: int | None = None, sentence_id: str | None = None,
         weights: str | None = None, config: str | None = None) -> str:
    """`uvd view`: a shard (.parquet) -> one sentence's contact sheet; anything else -> an image's reconstruction."""
    if Path(target).is_dir():
        raise ValueError(f"{target} is a folder; give one token shard (.parquet) of a run, or one image file")
    suffixes = "".join(Path(target).suffixes[-2:]).lower()
    if suffixes.endswith((".tar", ".tar.gz", ".tgz")):
        raise ValueError(f"{target}: a tar shard holds input images, not tokens; give a token shard (.parquet) of "
                         "a run, or one image file to see its reconstruction")
    if Path(target).suffix == ".parquet":
        if config is not None:
            raise ValueError("--config is for images; a shard is decoded with its run's tokenizer or --weights")
        return view_shard(target, out, row, sentence_id, weights)
    if row is not None or sentence_id is not None:
        raise ValueError("--row and --id select a sentence of a shard (.parquet)")
    return view_image(target, out, weights, config)
