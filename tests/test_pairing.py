"""Pairs -> {x1, y1, ... x8, y8} sentences over epochs, multi-annotation tuples, unused images."""
import random
from collections import Counter

import numpy as np
import pytest

from uvd.pipelines import pairing as P
from uvd import records as R
from uvd.records import ImageRecord, Reject, Sentence
from uvd.source import UnitImages


def record(key, pair, role):
    return ImageRecord(key, np.zeros(256, np.uint16), key, 64, 64, {"pair": pair, "role": role})


def fake_units(num_inputs=20, tasks=("depth", "normals"), skip=(), num_units=2):
    """Inputs img/NNN.png, each with every task's annotation except the (index, task)s in `skip`,
    cut into `num_units` units (1 or 2) at an input boundary."""
    images = []
    for i in range(num_inputs):
        key = f"img/{i:03d}.png"
        images.append(record(key, key, P.INPUT))
        images += [record(f"{key}#{t}", key, t) for t in tasks if (i, t) not in skip]
    if num_units == 1:
        return [UnitImages("u0", images)]
    cut = next(i for i, im in enumerate(images) if im.key == f"img/{num_inputs // 2:03d}.png")
    return [UnitImages("u0", images[:cut]), UnitImages("u1", images[cut:])]


def run(units, tasks=("depth", "normals"), seed=0, **options):
    opts = P.PairingOptions(**options)
    opts.validate("sentence")
    out = list(P.assemble_annotated(units, list(tasks), opts, random.Random(seed)))
    return [o for o in out if isinstance(o, Sentence)], [o for o in out if isinstance(o, Reject)]


def test_pair_layout_is_input_then_its_annotation():
    sentences, _ = run(fake_units())
    assert Counter(s.task for s in sentences) == {"depth": 2, "normals": 2}
    for s in sentences:
        assert len(s.images) == 16 and s.meta == {"annotation": s.task, "layout": "pairs", "epoch": 0, "num_pairs": 8}
        xs, ys = s.images[0::2], s.images[1::2]
        assert all(x.meta["role"] == P.INPUT for x in xs)
        assert [y.key for y in ys] == [f"{x.key}#{s.task}" for x in xs]
        assert len({x.key for x in xs}) == 8


def test_every_image_is_used_or_rejected_with_a_reason():
    units = fake_units(num_inputs=20)
    sentences, rejects = run(units)
    used = {im.key for s in sentences for im in s.images}
    everything = {im.key for u in units for im in u.images}
    assert used | {r.key for r in rejects} == everything and not used & {r.key for r in rejects}
    # 20 pairs per task -> 2 sentences, 4 pairs left: their annotations are unused; inputs may be used by the other task
    assert Counter(r.reason for r in rejects)[R.UNUSED_REMAINDER] >= 8
    assert all(r.reason == R.UNUSED_REMAINDER and r.unit in ("u0", "u1") for r in rejects)


def test_deterministic_under_the_seed():
    keys = lambda sentences: [tuple(im.key for im in s.images) for s in sentences]  # noqa: E731
    assert keys(run(fake_units(), seed=3)[0]) == keys(run(fake_units(), seed=3)[0])
    assert keys(run(fake_units(), seed=3)[0]) != keys(run(fake_units(), seed=4)[0])


def test_epochs_give_different_pairings_and_unique_ids():
    sentences, rejects = run(fake_units(num_inputs=16), epochs=3)
    assert Counter(s.meta["epoch"] for s in sentences) == {0: 4, 1: 4, 2: 4}
    ids = [s.sentence_id("test") for s in sentences]
    assert len(set(ids)) == len(ids) and not rejects
    # exactly 8 pairs: each epoch is a reordering of the same 8; a repeated order would repeat an id
    sentences, _ = run(fake_units(num_inputs=8, num_units=1), tasks=("depth",), epochs=20)
    assert len({s.sentence_id("test") for s in sentences}) == len(sentences) > 1


def test_pairing_is_unit_local_and_independent_of_other_units():
    units = fake_units(num_inputs=32)
    sentences, rejects = run(units, epochs=2)
    unit_of = {im.key: u.unit for u in units for im in u.images}
    assert all(len({unit_of[im.key] for im in s.images}) == 1 for s in sentences)  # no sentence crosses units
    assert Counter(unit_of[s.images[0].key] for s in sentences) == {"u0": 8, "u1": 8}  # 16 pairs/unit: 2 per task and epoch
    keys = lambda out: [tuple(im.key for im in s.images) for s in out if unit_of[s.images[0].key] == "u1"]  # noqa: E731
    alone, _ = run([units[1]], epochs=2)
    assert keys(sentences) == keys(alone)  # u1's sentences do not depend on u0 being there
    reordered, _ = run(units[::-1], epochs=2)
    assert keys(reordered) == keys(sentences)


def test_unpaired_images_are_rejected():
    units = fake_units(num_inputs=16, skip={(3, "depth"), (3, "normals")})
    units[1].images.append(record("img/999.png#depth", "img/999.png", "depth"))  # its input was rejected upstream
    sentences, rejects = run(units)
    by_key = {r.key: r.reason for r in rejects}
    assert by_key["img/003.png"] == P.UNPAIRED and by_key["img/999.png#depth"] == P.UNPAIRED
    assert not {"img/003.png", "img/999.png#depth"} & {im.key for s in sentences for im in s.images}


def test_tuples_are_subsets_of_one_image_and_its_annotations():
    tasks = ("depth", "normals", "edges")
    sentences, _ = run(fake_units(num_inputs=10, tasks=tasks), tasks=tasks, tuples=True, tuples_per_image=4)
    tuples = [s for s in sentences if s.task == P.TUPLE_TASK]
    assert tuples and all(s.meta["layout"] == "tuple" for s in tuples)
    sizes = Counter(len(s.images) for s in tuples)
    assert set(sizes) <= {2, 3, 4} and len(sizes) > 1  # m in [2, k+1] with k = 3
    for s in tuples:
        assert len({im.meta["pair"] for im in s.images}) == 1
        order = [P.INPUT, *tasks]
        roles = [im.meta["role"] for im in s.images]
        assert roles == sorted(roles, key=order.index) == s.meta["annotation"]
    assert len({s.sentence_id("t") for s in tuples}) == len(tuples)


def test_tuple_size_is_capped_at_16_images():
    tasks = tuple(f"t{i}" for i in range(20))
    sentences, _ = run(fake_units(num_inputs=2, tasks=tasks), tasks=tasks, tuples=True, min_tuple_size=16)
    assert sentences and all(len(s.images) == 16 for s in sentences if s.task == P.TUPLE_TASK)


def test_derived_first_puts_the_rendering_before_the_original():
    units = fake_units(num_inputs=8, tasks=("colorization",), num_units=1)
    opts = P.PairingOptions()
    out = [o for o in P.assemble_annotated(units, ["colorization"], opts, random.Random(0), derived_first=("colorization",))]
    (s,) = out
    assert [im.meta["role"] for im in s.images[:2]] == ["colorization", P.INPUT]


@pytest.mark.parametrize(
    "options, field",
    [({"pairs_per_sentence": 9}, "pairs_per_sentence"), ({"epochs": 0}, "epochs"), ({"min_tuple_size": 1}, "min_tuple_size")],
)
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ValueError, match=f"sentence.{field}"):
        P.PairingOptions(**options).validate("sentence")
