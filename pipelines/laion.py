"""`laion`: single-image sentences from img2dataset output (webdataset tar shards).

    uvd run recipes/laion.yaml --set inputs=/data/laion-subset --out out/laion

Reads `NNNNN.tar` (members KEY.jpg / KEY.txt / KEY.json) and, beside it, img2dataset's
`NNNNN.parquet`, whose `status` column records the downloads that failed: those become
`download_failed` rejects. Size, aspect and duplicate filters are the shared `filters`.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from uvd import records as R
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import Source, UnitImages, check_unique_names, resolve_inputs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class LaionOptions:
    keep_caption: bool = True  # store the caption in each sentence's meta (never in its pixels)


@register_source
class LaionSource(Source):
    name = "laion"
    Options = LaionOptions
    units_per_part = 1
    input_hint = "img2dataset shards *.tar"

    def list_units(self) -> list[str]:
        tars: list[Path] = []
        for path in resolve_inputs(self.recipe.inputs):
            tars.extend(sorted(path.glob("*.tar")) if path.is_dir() else [path])
        check_unique_names(tars, "shards")
        return [str(t) for t in tars]

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        tar_path = Path(unit)
        failed = _failed_downloads(tar_path.with_suffix(".parquet"))
        count = 0
        for key, members in _tar_samples(tar_path):
            if max_items is not None and count >= max_items:
                return
            count += 1
            item_key = f"{tar_path.name}/{key}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image_ext is None:
                yield Item(item_key, reject=R.NOT_AN_IMAGE, detail=f"no image member among {sorted(members)}")
                continue
            meta = json.loads(members["json"]) if "json" in members else {}
            info = {"url": meta.get("url")}
            if self.options.keep_caption:
                info["caption"] = members["txt"].decode("utf-8", "replace") if "txt" in members else meta.get("caption")
            yield Item(item_key, data=members[image_ext], meta=info)
        for key, error in failed:
            if max_items is not None and count >= max_items:
                return
            count += 1
            yield Item(f"{tar_path.name}/{key}", reject=R.DOWNLOAD_FAILED, detail=error or "")

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        for unit in units:
            for image in unit.images:
                yield Sentence("single", [image], meta=dict(image.meta))


def _failed_downloads(parquet_path: Path) -> list[tuple[str, str | None]]:
    """(key, error message) of each failed download in img2dataset's per-shard parquet."""
    if not parquet_path.is_file():
        return []
    table = pq.read_table(parquet_path, columns=["key", "status", "error_message"]).to_pydict()
    return [
        (key, error)
        for key, status, error in zip(table["key"], table["status"], table["error_message"])
        if status != "success"
    ]


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (webdataset convention: KEY.ext), streaming."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                if name.startswith("."):
                    continue
                stem, _, ext = name.partition(".")
                if stem != key and key is not None:
                    yield key, members
                    members = {}
                key = stem
                members[ext.lower()] = tar.extractfile(info).read()
    except tarfile.TarError as err:
        raise OSError(f"{path.name}: {err}") from err
    if key is not None:
        yield key, members
