"""Loading a `transformers` model folder offline, and its preprocessing without an image processor.

The folder is what `save_pretrained` writes (`config.json` + weights), plus, when the model came
with one, `preprocessor_config.json`: its `size`, `image_mean`, `image_std`, `rescale_factor` and
`ensure_multiple_of` are applied here with torch on the labeler's device, batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from uvd.pipelines.labelers.base import read_json, require_path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Preprocess:
    size: tuple[int, int]  # (height, width) the model is fed
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255


def load_model(weights: str | Path | None, auto_class, model_types: tuple[str, ...], what: str, device: str, dtype):
    """A model of one of `model_types` from a local folder, in eval mode on `device`; every
    mistake (missing folder, config or weights file, another architecture) is a ValueError
    naming the file, raised before any image is touched."""
    folder = require_path(weights, what)
    if not folder.is_dir():
        raise ValueError(f"weights: {folder} is a file; {what} needs a model folder (config.json + model.safetensors)")
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"weights: {folder / 'config.json'} is a {model_type!r} model; {what} needs one of {', '.join(model_types)}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"weights: {folder} has no {WEIGHT_FILES[0]} (or {', '.join(WEIGHT_FILES[1:])})")
    try:
        model, info = auto_class.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"weights: {folder} does not load as {model_type}: {str(err)[:300]}") from None
    # transformers re-initializes (randomly) what the checkpoint lacks or has in another shape, with
    # a mere warning: a labeler must never run half-random, so that is the user's mistake here.
    missing, mismatched = sorted(info.get("missing_keys") or []), sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = f"missing {missing[:3]}" if missing else f"of another shape {mismatched[:3]}"
        raise ValueError(f"weights: {folder} does not fit {type(model).__name__} ({len(missing) + len(mismatched)} tensors {detail}); "
                         f"is it a checkpoint of another task?")
    return model.to(device).eval(), config


def preprocess(folder: Path, config: dict, default_size: int, multiple: int = 1, size: int | None = None) -> Preprocess:
    """The model's input geometry and normalization: `size` (recipe option) wins, then the folder's
    preprocessor_config.json, then `default_size`; sides rounded up to a multiple of `multiple`."""
    pre = read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {}
    if size is not None:
        height = width = size
    elif isinstance(pre.get("size"), dict) and "height" in pre["size"]:
        height, width = pre["size"]["height"], pre["size"]["width"]
    elif isinstance(pre.get("size"), dict) and "shortest_edge" in pre["size"]:
        height = width = pre["size"]["shortest_edge"]
    elif isinstance(pre.get("size"), int):
        height = width = pre["size"]
    else:
        height = width = default_size
    multiple = max(multiple, int(pre.get("ensure_multiple_of", 1) or 1))
    height, width = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    mean = tuple(pre.get("image_mean", (0.485, 0.456, 0.406)))
    std = tuple(pre.get("image_std", (0.229, 0.224, 0.225)))
    scale = pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0
    return Preprocess((int(height), int(width)), mean, std, float(scale))


def patch_multiple(config: dict) -> int:
    """Input sides must be a multiple of the ViT patch (DINOv2 backbones: 14)."""
    backbone = config.get("backbone_config") or {}
    return int(backbone.get("patch_size") or config.get("patch_size") or 1) if config.get("model_type") == "depth_anything" else 1
