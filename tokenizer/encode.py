"""The tokenize stage: `ImageTokenizer` turns batches of 256x256 uint8 images into uint16 token ids.

A callable class for Ray `map_batches` (load in `__init__`, `__call__(batch) -> batch`); the same
object runs on a plain dict of numpy arrays in tests. Without `weights` it builds an UNTRAINED,
seeded VQGAN: the ids are deterministic but carry no learned meaning.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from uvd.registry import register_tokenizer_stage
from uvd.tokenizer.checkpoints import load_tokenizer
from uvd.tokenizer.vqgan import PRESETS, VQGANConfig, build_vqgan, resolve_config, weights_sha256

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_rejected(reason) -> bool:
    return reason is not None and str(reason) != ""


@register_tokenizer_stage
class ImageTokenizer:
    def __init__(
        self,
        config: dict | str | None,
        weights: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        num_threads: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"tokenizer dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"tokenizer device {device!r} asked for, but CUDA is not available")

        if weights is not None:
            model, cfg = load_tokenizer(weights)
            if config is not None and resolve_config(config) != cfg:
                raise ValueError(
                    f"tokenizer config {config!r} does not match the config.json in {weights}; "
                    "drop the config or make them agree"
                )
        else:
            if config is None:
                raise ValueError("ImageTokenizer needs a config (preset name or dict) or a weights directory")
            cfg = resolve_config(config)
            model = build_vqgan(cfg, seed)
        self.config: VQGANConfig = cfg
        self.dtype = DTYPES[dtype]
        sha = weights_sha256(model)
        preset = next((name for name, preset_cfg in PRESETS.items() if preset_cfg == cfg), "custom")
        self.info = dict(
            id=f"{preset}-{sha[:12]}",
            config=cfg.to_dict(),
            weights_sha256=sha,
            trained=weights is not None,
            device=str(self.device),
            dtype=dtype,
        )
        # channels_last: ~25% faster convs on CPU (oneDNN), and the layout cuDNN prefers.
        self.model = model.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)
        logger.info("tokenizer %s on %s (%s, trained=%s)", self.info["id"], self.device, dtype, self.info["trained"])

    @classmethod
    def describe(cls, config: dict | str | None = "lvm", weights: str | None = None, seed: int = 0, dtype: str = "float32") -> dict:
        """The `info` (id, config, weights hash, trained) of the tokenizer these arguments build, on CPU."""
        return cls(config, weights=weights, device="cpu", dtype=dtype, seed=seed).info

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H/f * W/f) uint16 token ids."""
        pixels = np.asarray(pixels)
        f = self.config.downsample_factor
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"encode_pixels expects (B, H, W, 3) uint8, got {pixels.dtype} {pixels.shape}")
        if pixels.shape[1] % f or pixels.shape[2] % f:
            raise ValueError(f"image size {pixels.shape[1:3]} is not a multiple of the tokenizer's f={f}")
        num_tokens = (pixels.shape[1] // f) * (pixels.shape[2] // f)
        if len(pixels) == 0:
            return np.zeros((0, num_tokens), dtype=np.uint16)
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # torch.from_numpy wants a writable buffer
            pixels = pixels.copy()
        x = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # uint8 crosses to the device; (B, H, W, 3) -> (B, 3, H, W) is already channels_last in memory.
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode(), self._autocast():
            ids = self.model.encode(x)  # (B, h*w) int64 in [0, num_embeddings)
        return ids.to("cpu").numpy().astype(np.uint16)

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N) token ids, N a square -> (B, H, W, 3) uint8 images."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or math.isqrt(tokens.shape[1]) ** 2 != tokens.shape[1]:
            raise ValueError(f"decode_tokens expects (B, N) with N a square number, got {tokens.shape}")
        if tokens.size and int(tokens.max()) >= self.config.num_embeddings:
            raise ValueError(
                f"token id {int(tokens.max())} is outside the codebook [0, {self.config.num_embeddings})"
            )
        ids = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        with torch.inference_mode(), self._autocast():
            images = self.model.decode(ids).float()  # (B, 3, H, W) in [0, 1]
        images = (images * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)
        return images.to("cpu").numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch["pixels"] (B, 256, 256, 3) uint8 -> batch["tokens"] (B, 256) uint16, "pixels" dropped.

        Rows whose batch["reject"] is a non-empty reason are not encoded and get all-zero tokens.
        """
        pixels = batch["pixels"]
        num_rows = len(pixels)
        reject = batch.get("reject")
        keep = np.ones(num_rows, dtype=bool)
        if reject is not None:
            keep = np.array([not _is_rejected(reason) for reason in reject], dtype=bool).reshape(num_rows)
        if "end" in batch:  # the runner's end-of-unit marker rows carry no image
            keep &= ~np.asarray(batch["end"], dtype=bool)
        tokens = np.zeros((num_rows, self.config.tokens_per_image), dtype=np.uint16)
        if keep.any():
            if isinstance(pixels, np.ndarray) and pixels.dtype != object:
                kept = pixels[keep]
            else:  # a list or object array of per-row images
                kept = np.stack([np.asarray(p) for p, k in zip(pixels, keep) if k])
            encoded = self.encode_pixels(kept)
            if encoded.shape[1] != tokens.shape[1]:
                raise ValueError(
                    f"images of size {kept.shape[1:3]} give {encoded.shape[1]} tokens, "
                    f"the tokenizer is set for {self.config.resolution}px ({tokens.shape[1]} tokens)"
                )
            tokens[keep] = encoded
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["tokens"] = tokens
        return out
