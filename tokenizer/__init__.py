"""VQGAN image tokenizer (f16, 8192 codes) and its Ray stage `ImageTokenizer`.

The core finds what this package provides through `uvd.registry.PLUGINS` (the tokenizer
stage, the run tokenizer, conversion, training, `uvd view`). The names below are imported on
first use, so `import tokenizer.config` (presets, checked by `uvd validate`) needs no torch.
"""

import importlib

_EXPORTS = {
    "ImageTokenizer": "tokenizer.encode",
    "load_tokenizer": "tokenizer.checkpoints",
    "PRESETS": "tokenizer.config",
    "VQGANConfig": "tokenizer.config",
    "VQGAN": "tokenizer.vqgan",
    "build_vqgan": "tokenizer.vqgan",
    "save_tokenizer": "tokenizer.vqgan",
    "weights_sha256": "tokenizer.vqgan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
