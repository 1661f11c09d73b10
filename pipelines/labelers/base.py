"""What every labeler shares: device and dtype, batching, weights checks and identity.

A labeler is a callable class (load in `__init__`, `__call__(pixels) -> renderings`): pixels are
(B, 256, 256, 3) uint8 RGB, the result one (256, 256, 3) uint8 rendering per image, drawn with the
shared renderers (pipelines/render.py). `label(pixels)` gives the raw labels instead (for
`labelers.save`), `render(label)` draws one, `identity()` says what determines the output.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no GPU")
    return device


def resolve_dtype(dtype: str, device: str):
    """auto: bfloat16 on a GPU, float32 on the CPU."""
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def require_path(path: str | Path | None, what: str, field: str = "weights") -> Path:
    """An existing local file or folder, or a ValueError naming it (nothing is ever downloaded)."""
    if not path:
        raise ValueError(f"{field}: {what} needs local weights (a folder or file); none given")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{field}: {p} does not exist ({what} loads local weights only; nothing is downloaded)")
    return p


def weights_sha256(path: Path | None) -> str | None:
    """sha256 over a weights file, or over a folder's files (relative names and contents, sorted)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update((f.name if path.is_file() else f.relative_to(path).as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, field: str = "weights") -> dict:
    if not path.is_file():
        raise ValueError(f"{field}: {path} is missing (expected a model folder saved with save_pretrained)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{field}: {path} is not valid JSON: {err}") from None


class Labeler:
    kind: ClassVar[str]

    def __init__(self, weights: str | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 16, **options: Any):
        self.weights = Path(weights).expanduser() if weights else None
        self.device = resolve_device(device)
        self.dtype_name = dtype if dtype != "auto" else ("bfloat16" if self.device == "cuda" else "float32")
        self.batch_size = batch_size
        self.options = options
        self._sha256: str | None = None

    def label(self, pixels: np.ndarray) -> list:
        """(B, 256, 256, 3) uint8 -> one raw label per image, computed `batch_size` at a time."""
        check_pixels(pixels)
        out: list = []
        for start in range(0, len(pixels), self.batch_size):
            out.extend(self.label_batch(pixels[start : start + self.batch_size]))
        return out

    def label_batch(self, pixels: np.ndarray) -> list:
        raise NotImplementedError

    def render(self, label) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [self.render(label) for label in self.label(pixels)]

    def identity(self) -> dict[str, Any]:
        """What determines the output (for cache keys): kind, weights digest, dtype, options."""
        if self._sha256 is None and self.weights is not None:
            self._sha256 = weights_sha256(self.weights)
        return {"kind": self.kind, "weights_sha256": self._sha256, "dtype": self.dtype_name, "options": dict(sorted(self.options.items()))}


def check_pixels(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.dtype != np.uint8:
        shape = getattr(pixels, "shape", None)
        raise ValueError(f"labelers take (B, H, W, 3) uint8 pixels, got {shape} {getattr(pixels, 'dtype', type(pixels))}")


def to_tensor(pixels: np.ndarray, device: str, dtype, size: tuple[int, int] | None, mean, std, scale: float = 1 / 255):
    """(B, H, W, 3) uint8 -> (B, 3, h, w) normalized tensor, resized bicubically to `size` on the device."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float()
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)  # as PIL resizes
    x = x * scale
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
