from collections import Counter

import numpy as np
import pytest

from uvd.pipelines.imagenet_groups import ImagenetGroupsSource
from uvd import records as R
from uvd.recipe import recipe_from_dict
from uvd.records import ImageRecord, Reject, Sentence
from uvd.source import UnitImages


def fake_units(num_classes=6, per_class=24):
    units = []
    for c in range(num_classes):
        wnid = f"n{c:08d}"
        images = [
            ImageRecord(f"{wnid}/{wnid}_{i}.JPEG", np.full(256, c, np.uint16), f"h{c}-{i}", 300, 300, {"category": wnid})
            for i in range(per_class)
        ]
        units.append(UnitImages(f"/data/train/{wnid}", images))
    return units


def assemble(seed=0, **sentence):
    recipe = recipe_from_dict({"source": "imagenet_groups", "inputs": "/tmp", "seed": seed, "sentence": sentence})
    return list(ImagenetGroupsSource(recipe).assemble(fake_units()))


def test_groups_have_k_images_per_category_and_use_each_image_once():
    out = assemble()
    sentences = [o for o in out if isinstance(o, Sentence)]
    rejects = [o for o in out if isinstance(o, Reject)]
    assert sentences
    used = [im.key for s in sentences for im in s.images]
    assert len(used) == len(set(used))
    assert len(used) + len(rejects) == 6 * 24  # every image is in a sentence or a reject
    assert all(r.reason == R.UNUSED_REMAINDER for r in rejects)
    for s in sentences:
        k = s.meta["k"]
        assert s.task == f"category_k{k}" and len(s.images) == 16
        categories = [im.key.split("/")[0] for im in s.images]
        # k consecutive images from each of 16/k distinct categories
        blocks = [categories[i : i + k] for i in range(0, 16, k)]
        assert all(len(set(b)) == 1 for b in blocks)
        assert len({b[0] for b in blocks}) == 16 // k
        assert [b[0] for b in blocks] == s.meta["categories"]


def test_deterministic_under_the_seed():
    keys = lambda out: [tuple(im.key for im in o.images) for o in out if isinstance(o, Sentence)]  # noqa: E731
    assert keys(assemble(seed=3)) == keys(assemble(seed=3))
    assert keys(assemble(seed=3)) != keys(assemble(seed=4))


def test_k_weights_select_the_group_sizes():
    tasks = Counter(o.task for o in assemble(k_weights={4: 1.0}) if isinstance(o, Sentence))
    assert set(tasks) == {"category_k4"}
    tasks = Counter(o.task for o in assemble(k_weights={4: 1.0, 8: 1.0, 16: 0.0}) if isinstance(o, Sentence))
    assert set(tasks) == {"category_k4", "category_k8"}
    # k=2 needs 8 categories: with 6 there is no sentence, and every image is accounted for as a reject
    out = assemble(k_weights={2: 1.0})
    assert not any(isinstance(o, Sentence) for o in out) and len(out) == 6 * 24
    # k=16 needs one category with 16 images left: 6 classes of 24 -> exactly 6 sentences, 48 left over
    out = assemble(k_weights={16: 1.0})
    assert sum(isinstance(o, Sentence) for o in out) == 6


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="sentence.k_weights"):
        recipe_from_dict({"source": "imagenet_groups", "inputs": "/tmp", "sentence": {"k_weights": {5: 1.0}}})
