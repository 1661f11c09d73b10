"""Shared fixtures: one embedded Ray for the whole session, the sample world built once; every
test runs in a scratch folder, so a default output (`out/<source>`, `audit.html`) never lands in the repo."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import uvd.pipelines  # noqa: E402,F401  (registers the sources)
import uvd.tokenizer  # noqa: E402,F401  (registers the tokenizer stage)

# Fast settings for tests: the tiny tokenizer config, small shards.
TEST_OVERRIDES = [
    "tokenizer.config=test",
    "tokenizer.batch_size=16",
    "output.sentences_per_shard=16",
    "limits.max_reject_rate=0.5",  # the small sample world is 40% deliberately broken inputs
]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipe(name: str, inputs, *extra: str):
    """recipes/<name>.yaml on `inputs`, with the fast test settings and then `extra` overrides."""
    from uvd.recipe import load_recipe

    return load_recipe(RECIPES / f"{name}.yaml", [f"inputs={inputs}", *TEST_OVERRIDES, *extra])


@pytest.fixture(scope="session", autouse=True)
def scratch_cwd(tmp_path_factory):
    """The session's working folder: hermetic tests whatever the repo's out/ holds (paths to the repo are absolute)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def ray_local():
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from uvd.demo.world import build_demo_world

    root = tmp_path_factory.mktemp("world")
    return build_demo_world(root, seed=0, small=True)
