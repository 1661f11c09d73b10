"""Surface-normals labeler: a normals network the user gives, or normals derived from predicted depth.

- `weights: FILE.pt`: a TorchScript normals network (any model exported with torch.jit.trace or
  torch.jit.script: (B, 3, H, W) normalized RGB -> (B, 3, h, w) normals; `options.axes` flips its
  axes into ours).
- `options.depth_weights: FOLDER`: a depth model (as the depth labeler), then normals from depth:
  each pixel is back-projected through a pinhole camera of `fov_degrees` horizontal field of view,
  the normal is the cross product of the surface's derivatives along image x and y (central
  differences), turned to face the camera.
Normals are camera-space unit vectors: x right, y down, z away from the camera (a surface facing
the camera has z = -1), drawn with the shared normals renderer ([-1, 1] -> [0, 255]).
Limits of normals from depth: a relative model's disparity has an unknown scale and shift, so it
is turned into depth as 1 / (normalized disparity + `disparity_shift`): orientations are
qualitative (slants exaggerated or flattened), the field of view is assumed, and depth edges
(an object in front of the background) give grazing normals along the outline.
"""
from __future__ import annotations

import numpy as np

from uvd.pipelines import render
from uvd.pipelines.labelers.base import Labeler, require_path, to_tensor


def normals_from_depth(depth: np.ndarray, fov_degrees: float = 60.0) -> np.ndarray:
    """(H, W) depth (> 0, camera z) -> (H, W, 3) float32 unit normals facing the camera."""
    height, width = depth.shape
    f = 0.5 * width / np.tan(np.radians(fov_degrees) / 2)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    z = depth.astype(np.float64)
    points = np.stack([(u - (width - 1) / 2) * z / f, (v - (height - 1) / 2) * z / f, z], axis=-1)  # (H, W, 3)
    d_dv, d_du = np.gradient(points, axis=(0, 1))
    n = np.cross(d_du, d_dv)
    n *= np.where(np.sum(n * points, axis=-1, keepdims=True) > 0, -1.0, 1.0)  # face the camera
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(length > 0, n / np.maximum(length, 1e-12), 0).astype(np.float32)


class NormalsLabeler(Labeler):
    """Options: `depth_weights` (normals from that depth model; else `weights` is a TorchScript
    normals network), `fov_degrees` (60), `disparity_shift` (0.05), `axes` ([1, 1, 1]: signs that turn
    the network's x, y, z into x right, y down, z away), `input_size` (the network's input side: 256 for
    TorchScript; the depth model's own default otherwise), `mean`/`std` (ImageNet, TorchScript only)."""

    kind = "normals"

    def __init__(self, weights=None, device="auto", dtype="auto", batch_size=16, depth_weights: str | None = None,
                 fov_degrees: float = 60.0, disparity_shift: float = 0.05, axes=(1, 1, 1), input_size: int | None = None,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__(weights if depth_weights is None else depth_weights, device, dtype, batch_size,
                         from_depth=depth_weights is not None, fov_degrees=fov_degrees, disparity_shift=disparity_shift,
                         axes=list(axes), input_size=input_size, mean=list(mean), std=list(std))
        if not 1 <= fov_degrees < 180:
            raise ValueError(f"options.fov_degrees: must be in [1, 180), got {fov_degrees}")
        if len(axes) != 3 or any(a not in (1, -1) for a in axes):
            raise ValueError(f"options.axes: three signs (1 or -1), got {axes}")
        import torch

        self.torch_dtype = getattr(torch, self.dtype_name)
        if depth_weights is not None:
            from uvd.pipelines.labelers.depth import DepthLabeler

            self.depth = DepthLabeler(depth_weights, self.device, self.dtype_name, batch_size, input_size=input_size)
            self.net = None
        else:
            path = require_path(weights, "the normals labeler (a TorchScript file, or options.depth_weights)")
            if not path.is_file():
                raise ValueError(f"weights: {path} is a folder; the normals labeler needs a TorchScript file, or options.depth_weights")
            try:
                self.net = torch.jit.load(str(path), map_location=self.device).eval().to(self.torch_dtype)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"weights: {path} is not a TorchScript model: {str(err)[:200]}") from None
            self.depth = None

    def label_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        """-> per image (256, 256, 3) float32 unit normals."""
        if self.depth is not None:
            out = []
            for pred in self.depth.label_batch(pixels):
                if self.depth.disparity:
                    lo, hi = float(pred.min()), float(pred.max())
                    pred = 1.0 / ((pred - lo) / max(hi - lo, 1e-12) + self.options["disparity_shift"])
                out.append(normals_from_depth(np.maximum(pred, 1e-6), self.options["fov_degrees"]))
            return out
        import torch
        import torch.nn.functional as F

        size = (self.options["input_size"] or 256,) * 2
        x = to_tensor(pixels, self.device, self.torch_dtype, size, self.options["mean"], self.options["std"])
        with torch.inference_mode():
            y = self.net(x)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if y.ndim != 4 or y.shape[1] < 3:
                raise ValueError(f"weights: the normals network returned {tuple(y.shape)}, expected (B, 3, h, w)")
            y = F.interpolate(y[:, :3].float(), size=pixels.shape[1:3], mode="bilinear", align_corners=False)
            y = y * torch.tensor(self.options["axes"], device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
            y = F.normalize(y, dim=1)
        return list(y.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32))

    def render(self, label: np.ndarray) -> np.ndarray:
        return render.render_normals(label)
