"""The source registry: `source:` in a recipe names a class registered here.

`pipelines/` registers its sources when imported (the CLI imports it); `uvd` itself
never imports `pipelines`.
"""
from __future__ import annotations

SOURCES: dict[str, type] = {}


def register_source(cls: type) -> type:
    if cls.name in SOURCES and SOURCES[cls.name] is not cls:
        raise ValueError(f"source {cls.name!r} registered twice")
    SOURCES[cls.name] = cls
    return cls


def get_source(name: str) -> type:
    if name not in SOURCES:
        known = ", ".join(sorted(SOURCES)) or "(none registered: import pipelines)"
        raise ValueError(f"source: unknown source {name!r}; known sources: {known}")
    return SOURCES[name]


# The tokenizer stage (a callable class for Ray's actor pool), registered by `tokenizer/`.
TOKENIZER_STAGE: list[type] = []


def register_tokenizer_stage(cls: type) -> type:
    TOKENIZER_STAGE[:] = [cls]
    return cls


def get_tokenizer_stage() -> type:
    if not TOKENIZER_STAGE:
        raise RuntimeError("no tokenizer stage registered: import tokenizer")
    return TOKENIZER_STAGE[0]


# The demo's last step (train a tiny LVM, prompt it), registered by `model/`.
TRAINER_DEMO: list = []


def register_trainer_demo(fn):
    TRAINER_DEMO[:] = [fn]
    return fn


def get_trainer_demo():
    if not TRAINER_DEMO:
        raise RuntimeError("no trainer registered: import model")
    return TRAINER_DEMO[0]
