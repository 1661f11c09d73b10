"""The one failure vocabulary: RejectError, the REASONS registry, and the README table made from it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import uvd.pipelines as pipelines  # registers every source and its reject reasons
from uvd.pipelines import mesh_render, render, video
from uvd import images
from uvd import records as R

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table() -> dict[str, str]:
    text = README.read_text()
    block = text.split(R.README_BEGIN)[1].split(R.README_END)[0]
    rows = [line for line in block.strip().splitlines()[2:]]
    table = {}
    for line in rows:
        match = re.fullmatch(r"\| `([a-z_]+)` \| (.+) \|", line)
        assert match, line
        assert match.group(1) not in table, f"{match.group(1)} listed twice"
        table[match.group(1)] = match.group(2)
    return table


def test_readme_table_lists_exactly_the_registered_codes_with_their_meanings():
    assert _readme_table() == R.REASONS
    assert R.write_reasons_table(README.read_text()) == README.read_text()  # `python -m uvd.records README.md` is a no-op


def test_every_code_a_module_declares_is_registered():
    # every reason constant of the modules that give rejects (NAME = "code" would skip the registry)
    declared = {}
    for module in (R, render, video, mesh_render, pipelines.pairing, pipelines.laion, pipelines.laion_shards,
                   pipelines.objaverse, pipelines.coco):
        source = Path(module.__file__).read_text()
        for name in re.findall(r"^([A-Z_]+) = (?:R\.)?reason\(", source, re.M):
            declared[name] = getattr(module, name)
        assert not re.findall(r'^[A-Z_]+ = "[a-z_]+"  # .*(reject|reason)', source, re.M | re.I), module.__name__
    assert set(declared.values()) <= set(R.REASONS)
    assert len(R.REASONS) >= 30
    assert pipelines.laion.MISSING_IMAGE is pipelines.pairing.MISSING_IMAGE is R.MISSING_IMAGE
    assert pipelines.objaverse.INCOMPLETE_WINDOW is video.INCOMPLETE_WINDOW is R.INCOMPLETE_WINDOW


def test_a_code_registered_again_must_keep_its_meaning():
    assert R.reason(R.EMPTY_FILE, R.REASONS[R.EMPTY_FILE]) == "empty_file"  # same meaning: fine
    with pytest.raises(ValueError, match="different meanings"):
        R.reason("empty_file", "something else")
    with pytest.raises(ValueError, match="lower_case"):
        R.reason("Bad Code", "x")
    assert R.REASONS["empty_file"].startswith("a file")


def test_a_pipeline_registers_its_own_code():
    code = R.reason("test_only_reason", "registered by a test")
    try:
        assert R.reason_meaning(code) == "registered by a test"
    finally:
        del R.REASONS[code]
    assert R.reason_meaning("never_registered_code") == ""


def test_one_exception_class_for_every_bad_input():
    assert images.ImageRejected is R.RejectError  # the name uvd/work.py still imports
    with pytest.raises(R.RejectError) as err:
        render.render_segmentation(np.zeros((2, 2, 2)))
    assert err.value.reason == render.BAD_ANNOTATION and err.value.detail
    with pytest.raises(R.RejectError) as err:
        mesh_render.load_normalized(Path(__file__))  # a Python file is no mesh
    assert err.value.reason == mesh_render.BROKEN_MESH
    for name in ("AnnotationError", "VideoError", "MeshError"):
        assert not hasattr(render, name) and not hasattr(video, name) and not hasattr(mesh_render, name)
