"""Recipes: one YAML file per dataset job, validated so that a bad field names itself.

    uvd run recipes/laion.yaml --set inputs=/data/laion --set limits.max_items=1000

A recipe has `source`, `inputs`, `seed`, and the sections `sentence` (the source's own
layout options), `image`, `filters`, `tokenizer`, `output`, `limits` and `labelers` (models that
annotate the input images in phase 1; their schema lives with the labelers plug-in).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uvd.config import apply_override, from_mapping, load_yaml_config  # noqa: F401  (re-exported: the loader lives in uvd/config.py)
from uvd.registry import get_source, plugin


@dataclass
class ImageOptions:
    size: int = 256  # output side; the tokenizer expects 256
    resize: str = "center_crop"  # center_crop: shorter side to size, then crop; resize: plain resize to size² (LVM)
    max_pixels: int = 178_956_970  # decompression-bomb guard: refuse larger images before decoding

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.resize", self.resize, ("center_crop", "resize"))
        _check_positive(f"{path}.size", self.size)
        if self.size != 256:
            raise ValueError(f"{path}.size: {self.size} gives {(self.size // 16) ** 2} tokens per image; the output "
                             "contract is 256 tokens (a 16x16 grid of the f16 tokenizer), so image.size must be 256")
        _check_positive(f"{path}.max_pixels", self.max_pixels)


@dataclass
class FilterOptions:
    min_side: int = 0  # reject images whose shorter side is below this (0: off)
    max_aspect: float = 0.0  # reject images with long/short side above this (0: off)
    dedup: bool = False  # reject exact duplicates (same content hash) after the first occurrence

    def validate(self, path: str) -> None:
        if self.min_side < 0:
            raise ValueError(f"{path}.min_side: must be >= 0, got {self.min_side}")
        if self.max_aspect and self.max_aspect < 1:
            raise ValueError(f"{path}.max_aspect: must be 0 (off) or >= 1, got {self.max_aspect}")


@dataclass
class TokenizerOptions:
    config: str = "lvm"  # preset name (lvm, maskgit, small, test) or a tokenizer directory
    weights: str | None = None  # tokenizer directory with weights; none: untrained weights from `seed`
    seed: int = 0  # seed of the untrained weights
    device: str = "auto"  # auto (GPU when the cluster has one), cpu, cuda
    dtype: str = "float32"  # float32 or bfloat16
    batch_size: int = 16  # images per encode call
    num_actors: int | None = None  # encoder actors; default: one per GPU, else one
    cpus_per_actor: float = 0.5  # fractional, so read tasks are never starved on small machines

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16"))
        _check_positive(f"{path}.batch_size", self.batch_size)
        if self.num_actors is not None:
            _check_positive(f"{path}.num_actors", self.num_actors)
        _check_positive(f"{path}.cpus_per_actor", self.cpus_per_actor)

    def identity(self) -> dict[str, Any]:
        """The fields that change the tokens (not where or how fast they are computed)."""
        return {"config": self.config, "weights": self.weights, "seed": self.seed, "dtype": self.dtype}


@dataclass
class OutputOptions:
    sentences_per_shard: int = 2000
    row_group_size: int = 256  # rows per Parquet row group: ~2 MB of tokens for 16-image rows
    compression: str = "zstd"
    compression_level: int = 3
    keep_work: bool = False  # keep the per-part token work files (_uvd/work/) after a finished run
    units_per_part: int | None = None  # units per Ray task and resume step; null: the source's default

    def validate(self, path: str) -> None:
        _check_positive(f"{path}.sentences_per_shard", self.sentences_per_shard)
        _check_positive(f"{path}.row_group_size", self.row_group_size)
        _check_choice(f"{path}.compression", self.compression, ("zstd", "snappy", "gzip", "none"))
        levels = {"zstd": (1, 22), "gzip": (1, 9)}.get(self.compression)
        if levels and not levels[0] <= self.compression_level <= levels[1]:
            raise ValueError(f"{path}.compression_level: {self.compression_level} is outside {self.compression}'s "
                             f"range {levels[0]}..{levels[1]}")
        if self.units_per_part is not None:
            _check_positive(f"{path}.units_per_part", self.units_per_part)


@dataclass
class LimitOptions:
    max_items: int | None = None  # read at most this many input items (first in input order)
    max_reject_rate: float = 0.25  # the job fails when more than this share of inputs is rejected
    max_member_bytes: int = 64 << 20  # one image file or tar member; larger ones are rejected too_large, unread
    max_file_bytes: int = 4 << 30  # one video or mesh file; larger ones are rejected too_large before decoding

    def validate(self, path: str) -> None:
        if self.max_items is not None:
            _check_positive(f"{path}.max_items", self.max_items)
        _check_positive(f"{path}.max_member_bytes", self.max_member_bytes)
        _check_positive(f"{path}.max_file_bytes", self.max_file_bytes)
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise ValueError(f"{path}.max_reject_rate: must be in [0, 1], got {self.max_reject_rate}")


@dataclass
class LabelerModel:
    """One labeler of the `labelers.models` list (the plug-in's LabelerSpec, checked by it)."""

    name: str  # its task name in sentences (a word: depth, edges, ...); its images are `<key>#<name>`
    kind: str  # depth | normals | edges | segmentation | pose
    weights: str | None = None  # local folder or file; nothing is downloaded
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    batch_size: int = 16
    num_actors: int | None = None  # actor pool size; default one per GPU, else one
    cpus_per_actor: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What changes its labels (the weights' content is hashed by the runner, not their path)."""
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "options": self.options}


@dataclass
class LabelerOptions:
    """`labelers`: models run on every input image in phase 1; their renderings are paired with
    the inputs like file annotations (8-pair sentences per labeler, tuples over several)."""

    save: bool = False  # also write the raw labels: labels/<source>-<part>.parquet
    models: list[LabelerModel] = field(default_factory=list)

    def validate(self, path: str) -> None:
        if self.models:  # the plug-in owns the schema (kinds, devices, option names)
            plugin("labelers").LabelersOptions.from_dict(dataclasses.asdict(self), path)

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def identity(self) -> dict[str, Any]:
        return {"save": self.save, "models": [m.identity() for m in self.models]}


@dataclass
class Recipe:
    source: str
    inputs: list[str]
    seed: int = 0
    sentence: Any = None  # the source's Options dataclass
    image: ImageOptions = field(default_factory=ImageOptions)
    filters: FilterOptions = field(default_factory=FilterOptions)
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    limits: LimitOptions = field(default_factory=LimitOptions)
    labelers: LabelerOptions = field(default_factory=LabelerOptions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Identity of what the recipe produces; execution-only fields are left out."""
        data = self.to_dict()
        data["tokenizer"] = self.tokenizer.identity()
        data["output"].pop("keep_work")
        data["limits"].pop("max_reject_rate")  # judged on the result; raising it must not redo the work
        data["labelers"] = {"save": self.labelers.save,
                            "models": [{**m.identity(), "weights": m.weights} for m in self.labelers.models]}
        if not self.labelers.models and not self.labelers.save:
            data.pop("labelers")  # recipes without labelers keep the hash they had before the section existed
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def work_identity(self) -> dict[str, Any]:
        """Every field that determines phase 1's tokens and rejects (the tokenizer's weights are
        hashed separately, by content); a work file made under another identity is redone."""
        return {"source": self.source, "seed": self.seed, "sentence": dataclasses.asdict(self.sentence),
                "image": dataclasses.asdict(self.image), "filters": dataclasses.asdict(self.filters),
                # batch_size too: batches may break near-tie codes differently, so work is reused only under the same one
                "tokenizer": {"seed": self.tokenizer.seed, "dtype": self.tokenizer.dtype, "batch_size": self.tokenizer.batch_size},
                **({"labelers": self.labelers.identity()} if self.labelers.models else {})}


_SECTIONS = {
    "image": ImageOptions,
    "filters": FilterOptions,
    "tokenizer": TokenizerOptions,
    "output": OutputOptions,
    "limits": LimitOptions,
    "labelers": LabelerOptions,
}
_TOP_KEYS = ("source", "inputs", "seed", "sentence", *_SECTIONS)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a recipe; any problem raises ValueError naming the field."""
    if not isinstance(data, dict):
        raise ValueError(f"recipe: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ValueError(f"{key}: unknown recipe key; expected one of {', '.join(_TOP_KEYS)}")
    if "source" not in data:
        raise ValueError("source: missing; name the source to run (e.g. source: laion)")
    source_cls = get_source(data["source"])
    if "inputs" not in data or data["inputs"] in (None, "", []):
        raise ValueError("inputs: missing; give a path, a glob, or a list of them")
    inputs = data["inputs"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        raise ValueError(f"inputs: expected a path or a list of paths, got {data['inputs']!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    sections = {name: from_mapping(cls, data.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    sentence = from_mapping(source_cls.Options, data.get("sentence") or {}, "sentence")
    recipe = Recipe(source=data["source"], inputs=inputs, seed=seed, sentence=sentence, **sections)
    for name in _SECTIONS:
        getattr(recipe, name).validate(name)
    if hasattr(sentence, "validate"):
        sentence.validate("sentence")
    source_cls.check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe and apply `--set key=value` overrides."""
    return load_yaml_config(path, overrides, recipe_from_dict)


def _check_choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{path}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(path: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{path}: must be > 0, got {value}")
