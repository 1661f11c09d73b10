"""VQGAN image tokenizer (f16, 8192 codes) and its Ray stage `ImageTokenizer`.

The core finds what this package provides through `uvd.registry.PLUGINS` (the tokenizer
stage, the run tokenizer, conversion, training, `uvd view`); importing it is never required.
"""

from tokenizer.checkpoints import load_tokenizer
from tokenizer.encode import ImageTokenizer
from tokenizer.vqgan import (
    PRESETS,
    VQGAN,
    VQGANConfig,
    build_vqgan,
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
