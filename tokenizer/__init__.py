"""VQGAN image tokenizer (f16, 8192 codes) and its Ray stage `ImageTokenizer`.

The core finds what this package provides through `uvd.registry.PLUGINS` (the tokenizer
stage, the run tokenizer, conversion, training, `uvd view`). The names below are imported on
first use, so `import uvd.tokenizer.config` (presets, checked by `uvd validate`) needs no torch.
"""

import importlib

_EXPORTS = {
    "ImageTokenizer": ".encode",
    "load_tokenizer": ".checkpoints",
    "PRESETS": ".config",
    "VQGANConfig": ".config",
    "VQGAN": ".vqgan",
    "build_vqgan": ".vqgan",
    "save_tokenizer": ".vqgan",
    "weights_sha256": ".vqgan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'uvd.tokenizer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
