"""A tokenizer training recipe (recipes/tokenizer/*.yaml): its dataclasses and loader, without torch.

    uvd tokenizer train recipes/tokenizer/demo_small.yaml [--set train.steps=100 ...]
    uvd validate recipes/tokenizer/demo_small.yaml

Loaded through uvd/config.py like every other config, so a bad field raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvd.tokenizer.config import resolve_config
from uvd.config import from_mapping, load_yaml_config, resolve_config_path


@dataclass
class DataEntry:
    recipe: str  # a UVD dataset recipe (recipes/*.yaml): its source, image and filter options are used
    inputs: Any = None  # overrides the recipe's inputs (a path, glob or list)
    overrides: list[str] = field(default_factory=list)  # more `key=value` overrides for that recipe


@dataclass
class TrainOptions:
    steps: int = 1000
    batch_size: int = 8  # per process
    crop_size: int = 256  # random crops of the 256x256 images (a multiple of 16; smaller is faster)
    lr: float = 2e-4
    disc_lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # taming's Adam betas
    grad_clip: float = 1.0
    codebook_weight: float = 1.0
    gan_start: int = 500  # the discriminator (and the generator's GAN loss) start at this step
    gan_weight: float = 0.1
    gan_loss: str = "hinge"  # or non_saturating
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
    perceptual_weights: str | None = None  # LPIPS-VGG16 weights file (see tokenizer/losses.py)
    restart_every: int = 50  # steps between dead-code restarts (0: off)
    restart_below: int = 1  # a code used fewer times than this since the last restart is dead
    checkpoint_every: int = 200
    log_every: int = 20
    resume: bool = True  # continue from OUT/checkpoint.pt when it exists
    device: str = "auto"
    dtype: str = "float32"  # bfloat16: autocast on GPU
    num_threads: int | None = None
    cache_images: bool = True  # keep decoded 256x256 training images in memory (small datasets)


@dataclass
class TokenizerTrainConfig:
    data: list[DataEntry]
    out: str
    model: Any = "small"  # preset name or a dict of VQGANConfig fields
    init: str | None = None  # start from these tokenizer weights (any layout load_tokenizer reads)
    seed: int = 0
    holdout_share: float = 0.1  # images held out of training (chosen by a hash of their key), for evaluation
    train: TrainOptions = field(default_factory=TrainOptions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_config_from_dict(data: dict[str, Any]) -> TokenizerTrainConfig:
    """Build and check a tokenizer training recipe; a bad field raises ValueError naming it."""
    if "data" in data and (not isinstance(data["data"], list) or not data["data"]):
        raise ValueError("data: expected a non-empty list of {recipe, inputs}")
    cfg = from_mapping(TokenizerTrainConfig, data, "")
    for i, entry in enumerate(cfg.data):
        if not resolve_config_path(entry.recipe).is_file():
            raise ValueError(f"data[{i}].recipe: {entry.recipe} not found (a dataset recipe such as recipes/laion.yaml)")
    try:
        resolve_config(cfg.model)  # a bad preset or field fails here, naming it
    except ValueError as err:
        raise ValueError(f"model: {err}") from None
    t = cfg.train
    if t.crop_size % 16 or not 16 <= t.crop_size <= 256:
        raise ValueError(f"train.crop_size: must be a multiple of 16 in [16, 256], got {t.crop_size}")
    if t.gan_loss not in ("hinge", "non_saturating"):
        raise ValueError(f"train.gan_loss: {t.gan_loss!r} is not one of hinge, non_saturating")
    if t.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype: {t.dtype!r} is not one of float32, bfloat16")
    if t.perceptual_weight > 0 and not t.perceptual_weights:
        raise ValueError("train.perceptual_weight > 0 needs train.perceptual_weights (an LPIPS-VGG16 weights file)")
    if not 0.0 <= cfg.holdout_share < 1.0:
        raise ValueError(f"holdout_share: must be in [0, 1), got {cfg.holdout_share}")
    return cfg


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TokenizerTrainConfig:
    """Read a tokenizer training recipe (recipes/tokenizer/*.yaml) with `--set key=value` overrides."""
    return load_yaml_config(path, overrides, train_config_from_dict, what="tokenizer recipe")
