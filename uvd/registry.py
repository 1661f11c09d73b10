"""The plug-in registry: how the core finds what `pipelines/`, `tokenizer/`, `model/` and `demo/` provide.

`uvd` never imports those packages. It names what it needs here (`PLUGINS`: a name -> the
module, or `module:attribute`, that provides it) and imports it on first use, so a command
that needs no model never imports torch. Installed packages add sources or replace a plug-in
with entry points in the group `uvd.plugins` (pyproject.toml lists UVD's own, the same as `PLUGINS`).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

PLUGIN_GROUP = "uvd.plugins"

# name -> "module" (imported for the registrations it makes) or "module:attribute".
PLUGINS: dict[str, str] = {
    "sources": "uvd.pipelines",  # importing it registers every source (register_source)
    "labelers": "uvd.pipelines.labelers",  # LabelersOptions (the recipe section's schema), build_labeler, LabelerStage, pair_labels
    "tokenizer_stage": "uvd.tokenizer.encode:ImageTokenizer",  # the Ray stage's callable class
    "run_tokenizer": "uvd.tokenizer.runs:load_run_tokenizer",  # run folder -> the tokenizer that made its shards
    "demo_tokenizer": "uvd.tokenizer.checkpoints:demo_weights_dir",  # -> the bundled demo tokenizer's folder
    "tokenizer_convert": "uvd.tokenizer.checkpoints:convert",
    "tokenizer_train_config": "uvd.tokenizer.train_config:load_train_config",
    "tokenizer_train": "uvd.tokenizer.train:train",
    "view": "uvd.tokenizer.view:view",
    "train_config": "uvd.model.config:load_train_config",
    "train": "uvd.model.train:train",
    "load_model": "uvd.model.checkpoint:load_model",
    "evaluate": "uvd.model.evaluate:evaluate",
    "ablate": "uvd.model.evaluate:ablate",
    "format_eval": "uvd.model.evaluate:format_results",
    "prompt": "uvd.model.prompt:prompt",
    "demo_lvm": "uvd.model.prompt:demo_lvm",  # the demo's last step: train a tiny LVM, prompt it
    "demo": "uvd.demo.run:run_demo",
}


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


def plugin_targets(name: str) -> list[str]:
    """Every provider of `name`: the built-in one, then those other installed packages declare.
    UVD's own entry points are skipped: `PLUGINS` is current even when the installed metadata is stale."""
    if name not in PLUGINS:
        raise KeyError(f"unknown plug-in {name!r}; known: {', '.join(PLUGINS)}")
    targets = [PLUGINS[name]]
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP, name=name):
        own = entry.dist is not None and entry.dist.name == "uvd"
        if not own and entry.value not in targets:
            targets.append(entry.value)
    return targets


def plugin(name: str) -> Any:
    """The object plug-in `name` provides (an entry point of another package wins over UVD's own)."""
    target = plugin_targets(name)[-1]
    try:
        return _load(target)
    except ImportError as err:
        raise RuntimeError(f"plug-in {name!r} ({target}) cannot be imported: {err}") from err


def load_plugins(name: str) -> None:
    """Import every provider of `name` (for plug-ins that register things when imported)."""
    for target in plugin_targets(name):
        _load(target)


# ---------------------------------------------------------------- sources

SOURCES: dict[str, type] = {}


def register_source(cls: type) -> type:
    if cls.name in SOURCES and SOURCES[cls.name] is not cls:
        raise ValueError(f"source {cls.name!r} registered twice")
    SOURCES[cls.name] = cls
    return cls


def get_source(name: str) -> type:
    if name not in SOURCES:
        load_plugins("sources")
    if name not in SOURCES:
        known = ", ".join(sorted(SOURCES)) or "(none registered)"
        raise ValueError(f"source: unknown source {name!r}; known sources: {known}")
    return SOURCES[name]


# ---------------------------------------------------------------- the tokenizer stage

# The callable class of Ray's actor pool; `tokenizer/` registers it when imported.
TOKENIZER_STAGE: list[type] = []


def register_tokenizer_stage(cls: type) -> type:
    TOKENIZER_STAGE[:] = [cls]
    return cls


def get_tokenizer_stage() -> type:
    if not TOKENIZER_STAGE:
        TOKENIZER_STAGE[:] = [plugin("tokenizer_stage")]
    return TOKENIZER_STAGE[0]


# ---------------------------------------------------------------- the demo's LVM step

TRAINER_DEMO: list = []


def register_trainer_demo(fn):
    TRAINER_DEMO[:] = [fn]
    return fn


def get_trainer_demo():
    if not TRAINER_DEMO:
        TRAINER_DEMO[:] = [plugin("demo_lvm")]
    return TRAINER_DEMO[0]
