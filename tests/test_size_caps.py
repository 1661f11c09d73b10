"""Resource caps: video and mesh files over `limits.max_file_bytes` are rejected `too_large`
before any decoder sees them (tar members: tests/test_laion.py)."""
import numpy as np
import pytest

from uvd.pipelines.objaverse import ObjaverseSource
from uvd.pipelines.video import VideoSource
from uvd.records import TOO_LARGE
from uvd.recipe import recipe_from_dict


def _garbage(path, size):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def test_video_over_the_cap_is_refused_before_decoding(tmp_path):
    clip = _garbage(tmp_path / "clip.mp4", 4000)
    capped = VideoSource(recipe_from_dict({"source": "video", "inputs": str(tmp_path), "limits": {"max_file_bytes": 3999}}))
    (item,) = list(capped.read_unit(str(clip)))
    assert item.reject == TOO_LARGE and "limits.max_file_bytes=3999" in item.detail
    default = VideoSource(recipe_from_dict({"source": "video", "inputs": str(tmp_path)}))
    (item,) = list(default.read_unit(str(clip)))
    assert item.reject not in ("", TOO_LARGE)  # the decoder saw it and refused it itself


def test_mesh_over_the_cap_is_refused_before_loading(tmp_path):
    mesh = _garbage(tmp_path / "thing.glb", 5000)
    capped = ObjaverseSource(recipe_from_dict({"source": "objaverse", "inputs": str(tmp_path), "limits": {"max_file_bytes": 4096}}))
    (item,) = list(capped.read_unit(str(mesh)))
    assert item.reject == TOO_LARGE and "5000 bytes" in item.detail


def test_caps_are_validated():
    with pytest.raises(ValueError, match="limits.max_file_bytes"):
        recipe_from_dict({"source": "video", "inputs": "x", "limits": {"max_file_bytes": -1}})
    with pytest.raises(ValueError, match="limits.max_member_bytes"):
        recipe_from_dict({"source": "laion", "inputs": "x", "limits": {"max_member_bytes": "big"}})
