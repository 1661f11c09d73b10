"""Labelers: models that make annotations from plain images (the paper's model-made annotations).

    labelers:                      # a recipe section (LabelersOptions)
      save: false                  # also keep the raw labels (encode_label) next to the shards
      models:
        - {name: depth, kind: depth, weights: /models/depth-anything-small}
        - {name: edges, kind: edges}                         # Canny: no weights
        - {name: segmentation, kind: segmentation, weights: /models/segformer-b0-ade}

`build_labeler(spec)` loads one (weights checked before any work); a labeler is called on
(B, 256, 256, 3) uint8 pixels and returns one (256, 256, 3) uint8 rendering per image.
In a run (uvd/runner.py, uvd/work.py) each labeler is a Ray actor pool of `LabelerWorker`s fed
from the part tasks; the runner finds this package through the `labelers` plug-in and pairs the
renderings with their inputs with `label_sentences` (8-pair sentences per labeler, tuples over
several). `LabelerStage` runs several on one Ray Data batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uvd.pipelines.labelers.base import Labeler
from uvd.pipelines.labelers.depth import DepthLabeler
from uvd.pipelines.labelers.edges import EdgesLabeler
from uvd.pipelines.labelers.normals import NormalsLabeler
from uvd.pipelines.labelers.pose import PoseLabeler
from uvd.pipelines.labelers.segmentation import SegmentationLabeler

LABELERS: dict[str, type[Labeler]] = {cls.kind: cls for cls in (DepthLabeler, NormalsLabeler, EdgesLabeler, SegmentationLabeler, PoseLabeler)}


@dataclass
class LabelerSpec:
    name: str  # the task its renderings get in sentences (depth, normals, edges, segmentation, pose, or your own)
    kind: str  # depth | normals | edges | segmentation | pose
    weights: str | None = None  # local folder or file; nothing is downloaded
    device: str = "auto"  # auto (GPU when there is one) | cpu | cuda
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU | float32 | bfloat16
    batch_size: int = 16
    num_actors: int | None = None  # actor pool size; default one per GPU, else one
    cpus_per_actor: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)  # the labeler class's own keyword options

    def validate(self, path: str) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"{path}.name: {self.name!r} must be a word (letters, digits, _)")
        if self.kind not in LABELERS:
            raise ValueError(f"{path}.kind: {self.kind!r} is not one of {', '.join(LABELERS)}")
        for name, value, allowed in (("device", self.device, ("auto", "cpu", "cuda")), ("dtype", self.dtype, ("auto", "float32", "bfloat16"))):
            if value not in allowed:
                raise ValueError(f"{path}.{name}: {value!r} is not one of {', '.join(allowed)}")
        if self.batch_size < 1:
            raise ValueError(f"{path}.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"{path}.num_actors: must be >= 1, got {self.num_actors}")
        if not isinstance(self.options, dict):
            raise ValueError(f"{path}.options: must be a mapping, got {type(self.options).__name__}")


@dataclass
class LabelersOptions:
    """The recipe's `labelers` section."""

    save: bool = False
    models: list[LabelerSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict | None, path: str = "labelers") -> LabelersOptions:
        data = dict(data or {})
        unknown = set(data) - {"save", "models"}
        if unknown:
            raise ValueError(f"{path}.{sorted(unknown)[0]}: unknown key; expected save, models")
        models = []
        for i, spec in enumerate(data.get("models") or []):
            if not isinstance(spec, dict):
                raise ValueError(f"{path}.models[{i}]: expected a mapping with name, kind, weights, ...")
            known = set(LabelerSpec.__dataclass_fields__)
            if set(spec) - known:
                raise ValueError(f"{path}.models[{i}].{sorted(set(spec) - known)[0]}: unknown key; expected one of {', '.join(known)}")
            if "name" not in spec or "kind" not in spec:
                raise ValueError(f"{path}.models[{i}]: needs name and kind")
            models.append(LabelerSpec(**spec))
        options = cls(save=bool(data.get("save", False)), models=models)
        options.validate(path)
        return options

    def validate(self, path: str = "labelers") -> None:
        names = [m.name for m in self.models]
        for i, spec in enumerate(self.models):
            spec.validate(f"{path}.models[{i}]")
        if len(set(names)) != len(names):
            raise ValueError(f"{path}.models: two labelers are named {sorted(n for n in names if names.count(n) > 1)[0]!r}")


def build_labeler(spec: LabelerSpec | dict, device: str | None = None) -> Labeler:
    """The labeler a spec describes, loaded (ValueError naming the missing or wrong file first).
    `device` overrides the spec's (the runner knows whether its actor got a GPU)."""
    if isinstance(spec, dict):
        spec = LabelerSpec(**spec)
    spec.validate("labeler")
    cls = LABELERS[spec.kind]
    try:
        return cls(spec.weights, device or spec.device, spec.dtype, spec.batch_size, **spec.options)
    except TypeError as err:  # an option the class does not take
        raise ValueError(f"labeler {spec.name!r}.options: {err}") from None


class LabelerStage:
    """Ray Data actor: adds `annotation/<name>` (B, 256, 256, 3) uint8 renderings to a batch with
    `pixels` (and `label/<name>` raw labels, encoded, when `save`); rejected rows pass untouched."""

    def __init__(self, specs: list[dict], device: str | None = None, save: bool = False, num_threads: int | None = None):
        if num_threads:  # CPU actors share the machine with read tasks and the tokenizer
            import torch

            torch.set_num_threads(num_threads)
        self.labelers = {s["name"]: build_labeler(s, device) for s in specs}
        self.save = save

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        ok = np.array([not r for r in batch["reject"]], bool) if "reject" in batch else np.ones(len(pixels), bool)
        for name, labeler in self.labelers.items():
            rendered = np.zeros_like(pixels)
            raw = np.empty(len(pixels), dtype=object)
            raw[:] = [b""] * len(pixels)
            if ok.any():
                labels = labeler.label(pixels[ok])
                rendered[ok] = np.stack([labeler_render(labeler, lab, img) for lab, img in zip(labels, pixels[ok])])
                if self.save:
                    raw[np.flatnonzero(ok)] = [encode_label(lab) for lab in labels]
            batch[f"annotation/{name}"] = rendered
            if self.save:
                batch[f"label/{name}"] = raw
        return batch

    def identities(self) -> dict[str, dict]:
        return {name: labeler.identity() for name, labeler in self.labelers.items()}


class LabelerWorker:
    """One labeler in a Ray actor (one per GPU, or a fractional-CPU actor): pixels in, renderings
    (and, with `save`, the encoded raw labels) out."""

    def __init__(self, spec: dict, device: str, save: bool = False, num_threads: int | None = None):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.labeler = build_labeler(spec, device)
        self.save = save

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, list[bytes] | None]:
        labels = self.labeler.label(pixels)
        rendered = np.stack([labeler_render(self.labeler, lab, img) for lab, img in zip(labels, pixels)]).astype(np.uint8)
        return rendered, ([encode_label(lab) for lab in labels] if self.save else None)

    def identity(self) -> dict:
        return self.labeler.identity()


def describe(specs: list[dict]) -> dict[str, dict]:
    """On the driver, before any work: load each labeler on the CPU (so a missing or mismatched
    weights file is a ValueError naming it) -> {name: identity (kind, weights sha256, dtype, options)}."""
    out = {}
    for i, spec in enumerate(specs):
        try:
            labeler = build_labeler({**spec, "device": "cpu"})
        except ValueError as err:
            raise ValueError(f"labelers.models[{i}] ({spec.get('name')}): {err}") from None
        out[spec["name"]] = {**labeler.identity(), "dtype": spec.get("dtype", "auto")}
        del labeler
    return out


def label_sentences(unit, names: list[str], rng, pairs_per_sentence: int = 8):
    """A unit's labeler sentences, paired exactly like file annotations (pipelines/pairing.py):
    `pairs_per_sentence`-pair sentences per labeler (`names` order) and, with two or more labelers,
    one multi-annotation tuple per input. `unit` holds the inputs and the label images (meta
    `pair`, `role`); yields Sentences, and Rejects for label images no sentence used (inputs are
    accounted for by their source)."""
    from uvd.pipelines.pairing import PairingOptions, assemble_unit

    labels = {im.key for im in unit.images if im.meta.get("role") in names}
    options = PairingOptions(pairs_per_sentence=pairs_per_sentence, tuples=len(names) >= 2)
    for obj in assemble_unit(unit, list(names), options, rng):
        if not hasattr(obj, "reason") or obj.key in labels:
            yield obj


def labeler_render(labeler: Labeler, label, image: np.ndarray) -> np.ndarray:
    return labeler.render(label, image) if isinstance(labeler, PoseLabeler) else labeler.render(label)


def encode_label(label: np.ndarray) -> bytes:
    """A raw label as bytes for `labelers.save`: `<dtype>|<shape>|` + the array's bytes (float32
    depth/disparity (256, 256), normals (256, 256, 3), edges uint8/float32 (256, 256), segmentation
    uint8 (256, 256), pose float32 (N, 17, 3)); `decode_label` reverses it."""
    label = np.ascontiguousarray(label)
    return f"{label.dtype.str};{','.join(map(str, label.shape))};".encode() + label.tobytes()


def decode_label(data: bytes) -> np.ndarray:
    dtype, shape, payload = data.split(b";", 2)
    dims = tuple(int(v) for v in shape.decode().split(",") if v)
    return np.frombuffer(payload, dtype=np.dtype(dtype.decode())).reshape(dims)


__all__ = ["LABELERS", "Labeler", "LabelerSpec", "LabelersOptions", "LabelerStage", "LabelerWorker", "build_labeler", "describe",
           "label_sentences", "encode_label", "decode_label"]
