"""Depth labeler: a `transformers` depth model (DPT, Depth Anything), rendered near-bright.

Relative models (DPT, Depth Anything "relative") predict disparity (large = near); metric ones
(`depth_estimation_type: metric`) predict depth (small = near). Either way the prediction is
resized to 256x256 and drawn with the shared depth colormap, nearest brightest.
"""
from __future__ import annotations

import numpy as np

from uvd.pipelines import render
from uvd.pipelines.labelers import hf
from uvd.pipelines.labelers.base import Labeler, to_tensor

DEPTH_MODEL_TYPES = ("dpt", "depth_anything", "glpn", "zoedepth", "depth_pro", "prompt_depth_anything")


class DepthLabeler(Labeler):
    """Options: `mode` colormap | grayscale; `input_size` (model input side; default from the folder)."""

    kind = "depth"

    def __init__(self, weights=None, device="auto", dtype="auto", batch_size=16, mode: str = "colormap", input_size: int | None = None):
        super().__init__(weights, device, dtype, batch_size, mode=mode, input_size=input_size)
        if mode not in ("colormap", "grayscale"):
            raise ValueError(f"options.mode: {mode!r} is not one of colormap, grayscale")
        import torch
        from transformers import AutoModelForDepthEstimation

        self.torch_dtype = getattr(torch, self.dtype_name)
        self.model, config = hf.load_model(weights, AutoModelForDepthEstimation, DEPTH_MODEL_TYPES, "the depth labeler", self.device, self.torch_dtype)
        self.pre = hf.preprocess(self.weights, config, default_size=384, multiple=hf.patch_multiple(config), size=input_size)
        self.disparity = config.get("depth_estimation_type", "relative") != "metric"

    def label_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        """-> per image (256, 256) float32: disparity (relative models) or depth (metric)."""
        import torch
        import torch.nn.functional as F

        x = to_tensor(pixels, self.device, self.torch_dtype, self.pre.size, self.pre.mean, self.pre.std, self.pre.scale)
        with torch.inference_mode():
            predicted = self.model(pixel_values=x).predicted_depth  # (B, h, w)
            out = F.interpolate(predicted[:, None].float(), size=pixels.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
        return list(out.cpu().numpy().astype(np.float32))

    def render(self, label: np.ndarray) -> np.ndarray:
        if self.disparity:
            return render.render_disparity(label, self.options["mode"])
        if not (np.isfinite(label) & (label > 0)).any():
            return np.zeros((*label.shape, 3), np.uint8)  # no positive depth anywhere: nothing to draw
        return render.render_depth(label, self.options["mode"])
