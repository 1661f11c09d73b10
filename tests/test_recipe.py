from pathlib import Path

import pytest
import yaml

from uvd.recipe import load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


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
