"""`objaverse`: multi-view renders of 3D objects, 24 azimuths cut to 16-view sentences (task `multiview`).

    uvd run recipes/objaverse.yaml --set inputs=/data/meshes --out out/objaverse

One unit per mesh file (GLB, GLTF, OBJ) under `inputs`; with `sentence.uids`, the `objaverse`
package first fetches those objects into its cache folder `inputs` (network needed), whose
layout (`glbs/<group>/<uid>.glb`) is then read like any folder. `read_unit` renders, inside the
Ray task, only the views some sentence uses (pipelines/mesh_render.py); each view is one item
`<mesh>#v<view:02d>` whose meta holds its camera. A broken mesh is a `broken_mesh` reject.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from uvd.pipelines.mesh_render import (  # noqa: F401  (BROKEN_MESH: a reason this source gives, via the renderer)
    BROKEN_MESH, NUM_VIEWS, PLATFORMS, YFOV, MeshRenderer, multiview_cameras,
)
from uvd.records import INCOMPLETE_WINDOW, ImageRecord, Item, Reject, RejectError, Sentence  # noqa: F401  (INCOMPLETE_WINDOW: given via assemble_windows)
from uvd.registry import register_source
from uvd.source import Source, UnitImages, assemble_windows, find_input_files, input_file_unit


@dataclass
class ObjaverseOptions:
    renderer: str = "auto"  # auto (EGL with an NVIDIA GPU, else OSMesa), osmesa, egl
    resolution: int = 256  # rendered side, pixels
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB in [0, 1]
    radius: list[float] = field(default_factory=lambda: [1.5, 2.2])  # camera distance, uniform, unit-bound object
    elevation: list[float] = field(default_factory=lambda: [-45.0, 45.0])  # degrees, uniform, one per object
    cut: str = "sliding"  # first: views 1-16 only; sliding: windows of `window` views every `window_step` views
    window: int = 16  # views per sentence (the 16-image context)
    window_step: int = 8  # sliding: 16 views every 8 -> views 0-15 and 8-23
    uids: list[str] = field(default_factory=list)  # Objaverse UIDs to fetch into `inputs` first (objaverse package)
    download_processes: int = 1
    extensions: list[str] = field(default_factory=lambda: ["glb", "gltf", "obj"])

    def validate(self, path: str) -> None:
        if self.renderer not in PLATFORMS:
            raise ValueError(f"{path}.renderer: {self.renderer!r} is not one of {', '.join(PLATFORMS)}")
        if self.cut not in ("first", "sliding"):
            raise ValueError(f"{path}.cut: {self.cut!r} is not one of first, sliding")
        if not 1 <= self.window <= min(16, NUM_VIEWS):
            raise ValueError(f"{path}.window: must be in 1..16, got {self.window}")
        if self.window_step < 1:
            raise ValueError(f"{path}.window_step: must be >= 1, got {self.window_step}")
        if self.resolution < 16:
            raise ValueError(f"{path}.resolution: must be >= 16, got {self.resolution}")
        if len(self.background) != 3 or not all(0.0 <= c <= 1.0 for c in self.background):
            raise ValueError(f"{path}.background: expected 3 floats in [0, 1], got {self.background}")
        for name, lo in (("radius", 0.0), ("elevation", -90.0)):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1] or value[0] < lo or (name == "elevation" and value[1] > 90):
                raise ValueError(f"{path}.{name}: expected [low, high] with low <= high, got {value}")
        if self.radius[0] <= 0:
            raise ValueError(f"{path}.radius: must be > 0, got {self.radius}")
        if self.download_processes < 1:
            raise ValueError(f"{path}.download_processes: must be >= 1, got {self.download_processes}")


def view_windows(options: ObjaverseOptions) -> list[list[int]]:
    """The views of each sentence, out of the 24 rendered azimuths."""
    if options.cut == "first":
        return [list(range(options.window))]
    starts = range(0, NUM_VIEWS - options.window + 1, options.window_step)
    return [list(range(s, s + options.window)) for s in starts]


def view_key(mesh: str, view: int) -> str:
    return f"{mesh}#v{view:02d}"


def fetch_objaverse(uids: list[str], cache: Path, download_processes: int = 1) -> dict[str, str]:
    """uid -> local path, via the objaverse package with its cache pointed at `cache`."""
    try:
        import objaverse
    except ImportError:
        raise ValueError("sentence.uids: needs the `objaverse` package (pip install objaverse==0.1.7)") from None
    cache.mkdir(parents=True, exist_ok=True)
    objaverse._VERSIONED_PATH = str(cache)  # the package reads its base path at call time
    return objaverse.load_objects(uids, download_processes=download_processes)


@register_source
class ObjaverseSource(Source):
    name = "objaverse"
    Options = ObjaverseOptions
    units_per_part = 4
    input_hint = "meshes (*.glb, *.gltf, *.obj)"

    def list_units(self) -> list[str]:
        if self.options.uids:  # on the driver, once: the read tasks only see the cache
            if len(self.recipe.inputs) != 1:
                raise ValueError("inputs: with sentence.uids, give one folder: the objaverse cache to download into")
            fetch_objaverse(self.options.uids, Path(self.recipe.inputs[0]).expanduser(), self.options.download_processes)
        return [str(p) for p in self._meshes()]

    def _meshes(self) -> dict[Path, str]:
        """Absolute path -> the name used in keys (relative to its input folder)."""
        if getattr(self, "_names", None) is None:
            self._names = find_input_files(self.recipe.inputs, self.options.extensions, "meshes")
        return self._names

    def cameras(self, name: str) -> list[dict]:
        o = self.options
        return multiview_cameras(name, self.recipe.seed, tuple(o.radius), tuple(o.elevation))

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        path, name, refused = input_file_unit(unit, self._meshes(), self.recipe.limits.max_file_bytes)
        if refused:
            yield refused
            return
        needed = sorted({v for w in view_windows(self.options) for v in w})[:max_items]
        cameras = [self.cameras(name)[v] for v in needed]
        renderer = MeshRenderer(self.options.resolution, self.options.background, self.options.renderer)
        try:
            views = list(renderer.render(path, cameras))  # 16-24 small images: fine to hold
        except RejectError as err:
            yield Item(name, reject=err.reason, detail=err.detail[:300])
            return
        for camera, pixels in views:
            meta = {"object": name, "view": camera["view"], "camera": camera, "renderer": renderer.platform}
            yield Item(view_key(name, camera["view"]), array=pixels, meta=meta)

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        o = self.options
        for unit in units:
            if not unit.images:
                continue
            name = unit.images[0].meta["object"]
            windows = [((j, views), [view_key(name, v) for v in views]) for j, views in enumerate(view_windows(o))]

            def sentence(window: tuple[int, list[int]], images: list[ImageRecord]) -> Sentence:
                j, views = window
                meta = {"object": name, "window": j, "views": views, "cameras": [im.meta["camera"] for im in images],
                        "yfov_deg": round(YFOV * 180 / 3.141592653589793, 4), "resolution": o.resolution,
                        "background": o.background, "renderer": images[0].meta["renderer"]}
                return Sentence("multiview", images, meta=meta)

            yield from assemble_windows(unit, windows, sentence, "every window using this view lost another view")
