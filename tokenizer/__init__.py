"""VQGAN image tokenizer (f16, 8192 codes) and its Ray stage `ImageTokenizer`."""

from tokenizer.encode import ImageTokenizer
from tokenizer.vqgan import (
    PRESETS,
    VQGAN,
    VQGANConfig,
    build_vqgan,
    load_tokenizer,
    save_tokenizer,
    weights_sha256,
)

__all__ = [
    "PRESETS",
    "VQGAN",
    "VQGANConfig",
    "ImageTokenizer",
    "build_vqgan",
    "load_tokenizer",
    "save_tokenizer",
    "weights_sha256",
]
