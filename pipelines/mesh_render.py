"""Offscreen multi-view rendering of meshes (trimesh + pyrender) and its camera maths.

Cameras follow the LVM / Zero123 setup: the object is centred and scaled to a unit bound
(longest side 1), the camera looks at the origin from radius r ~ U[1.5, 2.2] at one elevation
~ U[-45°, 45°] per object and 24 azimuths 15° apart; y is up. Headless GL: PYOPENGL_PLATFORM
must be set before pyrender (PyOpenGL) is first imported; `select_platform` does that.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np

from uvd.records import RejectError, reason

log = logging.getLogger(__name__)

NUM_VIEWS = 24
AZIMUTH_STEP = 15.0  # degrees: 24 x 15 = 360
YFOV = 2 * math.atan(16 / 35)  # radians (49.1°): a 35 mm lens on a 32 mm sensor, as Zero123's Blender script
PLATFORMS = ("auto", "osmesa", "egl")
BROKEN_MESH = reason("broken_mesh", "a mesh that cannot be loaded or rendered (broken file, no triangles, degenerate bounds)")


def multiview_cameras(key: str, seed: int, radius: tuple[float, float] = (1.5, 2.2),
                      elevation: tuple[float, float] = (-45.0, 45.0), num_views: int = NUM_VIEWS) -> list[dict]:
    """The cameras of object `key`: one radius and elevation drawn from a generator seeded by
    (seed, key) alone, so the same object and seed give the same cameras in any order or process."""
    rng = random.Random(f"{seed}:{key}")
    r = rng.uniform(*radius)
    el = rng.uniform(*elevation)
    cameras = []
    for view in range(num_views):
        az = view * AZIMUTH_STEP
        a, e = math.radians(az), math.radians(el)
        eye = np.array([r * math.cos(e) * math.sin(a), r * math.sin(e), r * math.cos(e) * math.cos(a)])
        cameras.append({"view": view, "azimuth_deg": az, "elevation_deg": el, "radius": r,
                        "position": [round(float(v), 6) for v in eye],
                        "pose": np.round(look_at(eye), 6).tolist()})
    return cameras


def look_at(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world (4, 4) pose in OpenGL convention: the camera looks down its -z axis."""
    z = eye - np.asarray(target, dtype=float)
    z /= np.linalg.norm(z)
    x = np.cross(up, z)
    if np.linalg.norm(x) < 1e-9:  # looking straight up or down
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, np.cross(z, x), z, eye
    return pose


def select_platform(renderer: str) -> str:
    """Set PYOPENGL_PLATFORM for `renderer` (auto: EGL when an NVIDIA GPU is present, else OSMesa).
    A platform the user already set in the environment wins over `auto`."""
    if renderer == "auto":
        renderer = os.environ.get("PYOPENGL_PLATFORM") or ("egl" if Path("/dev/nvidia0").exists() else "osmesa")
    current = os.environ.get("PYOPENGL_PLATFORM")
    if "OpenGL" in sys.modules and current and current != renderer:
        log.warning("PyOpenGL already loaded with platform %s in this process; %s cannot be used", current, renderer)
        return current
    os.environ["PYOPENGL_PLATFORM"] = renderer
    return renderer


def load_normalized(path: str | Path):
    """Load a GLB/GLTF/OBJ as a trimesh Scene -> (scene, (4, 4) transform to the unit bound)."""
    import trimesh

    try:
        scene = trimesh.load(str(path), force="scene")
    except Exception as err:  # noqa: BLE001  trimesh's loaders raise many exception types on bad files
        raise RejectError(BROKEN_MESH, f"{type(err).__name__}: {str(err)[:200]}") from None
    if not scene.geometry or not any(len(getattr(g, "faces", ())) for g in scene.geometry.values()):
        raise RejectError(BROKEN_MESH, "no triangles in the file")
    bounds = scene.bounds
    if bounds is None or not np.all(np.isfinite(bounds)):
        raise RejectError(BROKEN_MESH, "bounds are not finite")
    extent = float((bounds[1] - bounds[0]).max())
    if extent <= 0:
        raise RejectError(BROKEN_MESH, "zero-size bounds")
    transform = np.eye(4)
    transform[:3, :3] /= extent
    transform[:3, 3] = -bounds.mean(axis=0) / extent
    return scene, transform


_RENDERERS: dict[tuple, object] = {}  # one GL context per process and size, reused by every object


class MeshRenderer:
    def __init__(self, size: int = 256, background=(1.0, 1.0, 1.0), platform: str = "auto"):
        self.platform = select_platform(platform)
        self.size, self.background = size, [float(c) for c in background] + [1.0]

    def render(self, path: str | Path, cameras: list[dict]):
        """Yield (camera, (size, size, 3) uint8) for each camera; RejectError(broken_mesh) for a broken mesh."""
        import pyrender

        tm_scene, transform = load_normalized(path)
        scene = pyrender.Scene(bg_color=self.background, ambient_light=[0.35, 0.35, 0.35])
        try:
            for node in tm_scene.graph.nodes_geometry:
                pose, name = tm_scene.graph[node]
                geometry = tm_scene.geometry[name]
                if not len(getattr(geometry, "faces", ())):
                    continue  # points or lines inside a GLB: nothing to shade
                smooth = geometry.visual.kind != "face"  # flat-coloured faces must not be smoothed
                scene.add(pyrender.Mesh.from_trimesh(geometry, smooth=smooth), pose=transform @ pose)
        except Exception as err:  # noqa: BLE001  malformed buffers, materials or textures
            raise RejectError(BROKEN_MESH, f"{type(err).__name__}: {str(err)[:200]}") from None
        camera = scene.add(pyrender.PerspectiveCamera(yfov=YFOV, znear=0.05, zfar=10.0))
        light = scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=3.0))  # a headlight
        renderer = _RENDERERS.get((self.platform, self.size))
        if renderer is None:
            renderer = _RENDERERS[(self.platform, self.size)] = pyrender.OffscreenRenderer(self.size, self.size)
        for cam in cameras:
            pose = np.asarray(cam["pose"])
            scene.set_pose(camera, pose)
            scene.set_pose(light, pose)
            color, _ = renderer.render(scene)
            yield cam, np.ascontiguousarray(color[..., :3], dtype=np.uint8)
