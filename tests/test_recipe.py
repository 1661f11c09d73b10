"""Recipes and the one config loader (uvd/config.py): every shipped config file loads with its own
schema (as litgpt tests its configs), bad fields are named, overrides and numbers behave."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from uvd.config import apply_override, from_mapping, recipes_dir, resolve_config_path
from uvd.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ALL_CONFIGS = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(ROOT / "recipes")) for p in ALL_CONFIGS])
def test_every_config_file_loads_with_its_schema(path):
    from uvd.cli import config_kind, validate_config

    data = yaml.safe_load(path.read_text())
    kind = config_kind(path, data)
    folder = path.parent.name
    assert kind == {"train": "training config", "tokenizer": "tokenizer training recipe", "mixes": "target mix"}.get(folder, "recipe")
    assert validate_config(path).startswith(kind)


def test_config_folders_are_known():
    """A new folder under recipes/ needs a schema in `uvd validate` (and a package-data entry in pyproject)."""
    assert {p.name for p in (ROOT / "recipes").iterdir() if p.is_dir()} <= {"train", "tokenizer", "mixes"}


def test_shipped_configs_are_found_from_anywhere(tmp_path, monkeypatch):
    assert recipes_dir() == (ROOT / "recipes").resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("recipes/laion.yaml") == recipes_dir() / "laion.yaml"
    assert resolve_config_path("train/tiny.yaml") == recipes_dir() / "train" / "tiny.yaml"
    assert resolve_config_path("nope.yaml") == Path("nope.yaml")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "laion.yaml").write_text("source: laion\ninputs: mine\n")
    assert load_recipe("recipes/laion.yaml").inputs == ["mine"]  # a file that exists wins


@dataclass
class _Inner:
    rate: float = 0.5
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    out: str
    inner: _Inner = field(default_factory=_Inner)
    steps: int | None = None


def test_from_mapping_nested_required_and_types():
    cfg = from_mapping(_Outer, {"out": "x", "inner": {"rate": "3e-4", "names": ["a"]}, "steps": None}, "")
    assert cfg == _Outer(out="x", inner=_Inner(rate=3e-4, names=["a"]), steps=None)
    with pytest.raises(ValueError, match=r"^out: required$"):
        from_mapping(_Outer, {}, "")
    with pytest.raises(ValueError, match=r"^cfg\.inner\.rat: unknown key; expected one of rate, names$"):
        from_mapping(_Outer, {"out": "x", "inner": {"rat": 1}}, "cfg")
    with pytest.raises(ValueError, match=r"inner\.names\[1\]: expected a string, got 2"):
        from_mapping(_Outer, {"out": "x", "inner": {"names": ["a", 2]}}, "")
    with pytest.raises(ValueError, match=r"steps: expected an integer, got 1.5"):
        from_mapping(_Outer, {"out": "x", "steps": 1.5}, "")


def test_apply_override():
    data = {"a": {"b": 1}}
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "d.e.f=3e-4")  # new sections are made; the value stays YAML's (a string here)
    apply_override(data, "g=")
    assert data == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": {"f": "3e-4"}}, "g": None}
    with pytest.raises(ValueError, match="a.b.c=1: b is not a section"):
        apply_override(data, "a.b.c=1")
    with pytest.raises(ValueError, match="not a dotted key"):
        apply_override(data, "a..b=1")
    with pytest.raises(ValueError, match=r"--set x=\{a: 1: the value is not valid YAML"):
        apply_override(data, "x={a: 1")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.source == yaml.safe_load(path.read_text())["source"]
    assert recipe.inputs


def test_recipes_cover_every_registered_source():
    from uvd.registry import SOURCES

    shipped = {yaml.safe_load(p.read_text())["source"] for p in RECIPES}
    assert set(SOURCES) <= shipped


def _base(**extra):
    return {"source": "laion", "inputs": "/tmp", **extra}


@pytest.mark.parametrize(
    "data, field",
    [
        (_base(colour="red"), "colour"),
        (_base(image={"size": 250}), "image.size"),
        (_base(image={"resize": "stretch"}), "image.resize"),
        (_base(tokenizer={"dtype": "fp8"}), "tokenizer.dtype"),
        (_base(tokenizer={"batch_size": "many"}), "tokenizer.batch_size"),
        (_base(filters={"dedupe": True}), "filters.dedupe"),
        (_base(limits={"max_reject_rate": 2}), "limits.max_reject_rate"),
        ({"source": "laion"}, "inputs"),
        ({"source": "nope", "inputs": "x"}, "source"),
        ({"source": "imagenet_groups", "inputs": "x", "sentence": {"k_weights": {3: 1.0}}}, "sentence.k_weights"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        recipe_from_dict(data)


def test_overrides_and_hash(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_base()))
    recipe = load_recipe(path, ["inputs=/data/x", "limits.max_items=10", "tokenizer.dtype=bfloat16"])
    assert recipe.inputs == ["/data/x"] and recipe.limits.max_items == 10 and recipe.tokenizer.dtype == "bfloat16"
    # Execution-only fields do not change the recipe's identity; output-changing ones do.
    faster = load_recipe(path, ["inputs=/data/x", "limits.max_items=10", "tokenizer.dtype=bfloat16", "tokenizer.batch_size=99"])
    assert faster.hash() == recipe.hash()
    other = load_recipe(path, ["inputs=/data/x", "limits.max_items=11", "tokenizer.dtype=bfloat16"])
    assert other.hash() != recipe.hash()
    with pytest.raises(ValueError, match="key=value"):
        load_recipe(path, ["limits.max_items"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict(_base(filters={"dedup": True, "min_side": 64}))
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
