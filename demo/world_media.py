"""Media sets for the sample world: generated videos, GLB meshes and annotated video clips, in
the layouts `pipelines/video.py`, `pipelines/objaverse.py` and `pipelines/annotated_video.py`
read. Each builder plants known-bad files and returns a manifest like demo/world.py's:
`path`, `items` (rows the reader yields), `expected_rejects` and `keys_by_reason`, plus what
a correct pipeline must make of the good files. `build_media_world(root)` builds all three.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from uvd.demo.world import _prepare_root
from uvd.pipelines.objaverse import BROKEN_MESH
from uvd.pipelines.pairing import MISSING_ANNOTATION, UNPAIRED
from uvd.pipelines.render import BAD_ANNOTATION
from uvd.pipelines.video import CORRUPT_VIDEO, TOO_SHORT, TRUNCATED_VIDEO
from uvd import records as R

VIDEO_W, VIDEO_H = 160, 120
FPS = 30


def _reject(manifest: dict, reason: str, key: str) -> None:
    manifest["expected_rejects"][reason] = manifest["expected_rejects"].get(reason, 0) + 1
    manifest["keys_by_reason"].setdefault(reason, []).append(key)


def video_frame(index: int, seed: int, width: int = VIDEO_W, height: int = VIDEO_H) -> np.ndarray:
    """Frame `index` of a generated clip: a drifting gradient and a square moving 1.5 px/frame,
    so frames 10, 20 and 30 apart look clearly different. (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    phase = index / 90.0
    frame = base + 50 * np.sin(2 * np.pi * (x + phase)) + 30 * y
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    size = height // 4
    cx = int((index * 1.5) % (width - size))
    cy = int((height - size) / 2 * (1 + np.sin(index / 25.0)))
    frame[cy : cy + size, cx : cx + size] = (255 - base).astype(np.uint8)
    return frame


def write_video(path: Path, num_frames: int, seed: int, codec: str = "libx264", fps: int = FPS,
                width: int = VIDEO_W, height: int = VIDEO_H, faststart: bool = True) -> None:
    """Encode a generated clip with PyAV (its wheel carries libx264; no ffmpeg binary needed)."""
    import av

    options = {"movflags": "+faststart"} if faststart and path.suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "g": "48"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(video_frame(i, seed, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# name -> (frames, codec); expected windows per stride with the default video recipe
# (16 frames, strides 10/20/30, window_step = 16 x stride, start 0, max_windows 4).
VIDEOS = {
    "clips/long.mp4": (480, "libx264"),  # s10: starts 0, 160, 320; s20: 0; s30: 0
    "clips/medium.mkv": (320, "libx264"),  # s10: 0, 160; s20: 0 (301 frames fit); s30: none
    "clips/short.avi": (200, "mpeg4"),  # s10: 0; s20, s30: none
    "clips/tiny.mp4": (90, "libx264"),  # no window fits: too_short
}


def build_video_world(root: Path, seed: int = 0) -> dict:
    """Generated clips (mp4/mkv/avi) plus an empty, a truncated and a corrupt mp4."""
    root = _prepare_root(root)
    manifest = {"path": str(root), "videos": {}, "items": 0, "expected_rejects": {}, "keys_by_reason": {}}
    for i, (name, (frames, codec)) in enumerate(VIDEOS.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, frames, seed + i, codec)
        manifest["videos"][name] = frames
    _reject(manifest, TOO_SHORT, "clips/tiny.mp4")
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.mp4").write_bytes(b"")
    _reject(manifest, R.EMPTY_FILE, "broken/empty.mp4")
    write_video(broken / "truncated.mp4", 200, seed + 10)  # faststart: the header survives the cut
    data = (broken / "truncated.mp4").read_bytes()
    (broken / "truncated.mp4").write_bytes(data[: len(data) // 3])
    _reject(manifest, TRUNCATED_VIDEO, "broken/truncated.mp4")
    rng = np.random.default_rng(seed)
    (broken / "corrupt.webm").write_bytes(b"\x1a\x45\xdf\xa3" + rng.bytes(4096))
    _reject(manifest, CORRUPT_VIDEO, "broken/corrupt.webm")
    # default recipe: distinct frames decoded (long 48, medium 32, short 16) + one reject row per bad file
    manifest["frames"] = 48 + 32 + 16
    manifest["items"] = manifest["frames"] + 4
    manifest["tasks"] = {"video_s10": 6, "video_s20": 2, "video_s30": 1}
    return manifest


# ----------------------------------------------------------------------------- meshes


def _coloured(mesh, rgb: tuple[int, int, int]):
    mesh.visual.face_colors = np.array([*rgb, 255], dtype=np.uint8)
    return mesh


def build_mesh_world(root: Path, seed: int = 0) -> dict:
    """Coloured trimesh primitives exported to GLB (and one OBJ), a corrupt GLB and an empty file."""
    import trimesh

    root = _prepare_root(root)
    manifest = {"path": str(root), "meshes": [], "items": 0, "expected_rejects": {}, "keys_by_reason": {}}
    shapes = {
        "box.glb": _coloured(trimesh.creation.box(extents=(1.0, 0.6, 0.3)), (220, 60, 40)),
        "capsule.glb": _coloured(trimesh.creation.capsule(height=1.0, radius=0.3), (40, 120, 220)),
        "cone.obj": _coloured(trimesh.creation.cone(radius=0.5, height=1.2), (60, 180, 70)),
    }
    scene = trimesh.Scene()
    scene.add_geometry(_coloured(trimesh.creation.box(extents=(1.2, 0.1, 0.8)), (200, 170, 60)), node_name="table")
    leg = trimesh.creation.cylinder(radius=0.05, height=0.7)  # along z: stand it up along y
    leg.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
    for j, (x, z) in enumerate(((-0.5, -0.3), (0.5, -0.3), (-0.5, 0.3), (0.5, 0.3))):
        transform = trimesh.transformations.translation_matrix((x, -0.35, z))
        scene.add_geometry(_coloured(leg.copy(), (120, 80, 40)), node_name=f"leg{j}", transform=transform)
    shapes["table.glb"] = scene
    for name, shape in shapes.items():
        shape.export(root / name)
        manifest["meshes"].append(name)
    glb = (root / "box.glb").read_bytes()
    (root / "corrupt.glb").write_bytes(glb[:20] + bytes(len(glb) - 20))  # a glTF header, then zeros
    _reject(manifest, BROKEN_MESH, "corrupt.glb")
    (root / "empty.glb").write_bytes(b"")
    _reject(manifest, R.EMPTY_FILE, "empty.glb")
    manifest["items"] = 24 * len(manifest["meshes"]) + 2  # default recipe: 24 views per good mesh
    return manifest


# ----------------------------------------------------------------------------- annotated clips


def _clip_frame(index: int, seed: int, width: int = VIDEO_W, height: int = VIDEO_H) -> tuple[np.ndarray, np.ndarray]:
    """A frame of a moving-blobs clip and its label map (0 background, 1 and 2 objects)."""
    frame = video_frame(index * 3, seed, width, height)
    labels = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for label, (speed, radius) in ((1, (4.0, 22)), (2, (-3.0, 16))):
        cx = (width / 2 + speed * index + 20 * label) % width
        cy = height / 2 + 20 * np.sin(index / 3 + label)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        labels[inside] = label
        frame[inside] = (230, 60, 60) if label == 1 else (60, 60, 230)
    return frame, labels


def build_annotated_video_world(root: Path, seed: int = 0) -> dict:
    """VIPSeg/JHMDB-style clips: `<clip>/frames/NNNNNN.jpg` and `<clip>/masks/NNNNNN.png`
    (8-bit class ids). clip_b misses one mask; clip_c has a mask that is not a label map."""
    root = _prepare_root(root)
    manifest = {"path": str(root), "clips": {}, "items": 0, "expected_rejects": {}, "keys_by_reason": {}}
    for c, (clip, num_frames) in enumerate((("clip_a", 16), ("clip_b", 11), ("clip_c", 6))):
        (root / clip / "frames").mkdir(parents=True)
        (root / clip / "masks").mkdir()
        for i in range(num_frames):
            frame, labels = _clip_frame(i, seed + c)
            Image.fromarray(frame).save(root / clip / "frames" / f"{i:06d}.jpg", quality=90)
            if clip == "clip_b" and i == 5:
                continue
            if clip == "clip_c" and i == 2:
                (root / clip / "masks" / f"{i:06d}.png").write_bytes(b"not a png")
                continue
            Image.fromarray(labels, mode="L").save(root / clip / "masks" / f"{i:06d}.png")
        manifest["clips"][clip] = num_frames
    _reject(manifest, MISSING_ANNOTATION, "clip_b/frames/000005.jpg")
    _reject(manifest, BAD_ANNOTATION, "clip_c/masks/000002.png#segmentation")
    _reject(manifest, UNPAIRED, "clip_c/frames/000002.jpg")
    # default recipe (8 pairs per sentence, min_frames 2): clip_a 8 + 8, clip_b 8 + 2 (frame 5 lost), clip_c 5
    manifest["windows"] = 5
    manifest["pairs"] = 16 + 10 + 5
    manifest["items"] = 2 * 16 + (2 * 10 + 1) + (6 + 5 + 1)
    return manifest


def build_media_world(root: Path, seed: int = 0) -> dict:
    root = Path(root)
    return {
        "video": build_video_world(root / "videos", seed),
        "meshes": build_mesh_world(root / "meshes", seed),
        "annotated_video": build_annotated_video_world(root / "annotated_video", seed),
    }
