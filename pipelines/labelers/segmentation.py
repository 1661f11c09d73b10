"""Segmentation labeler: a `transformers` semantic-segmentation model (SegFormer or Mask2Former).

An ADE20K model (150 labels) is drawn with ADE20K's palette: its class c (0 = wall ...) is label
value c + 1, as in ADEChallengeData2016's annotation PNGs, so model labels and ADE20K's own files
look alike. Any other label set uses the PASCAL VOC palette with value c (c <= 254).
SegFormer: the logits (B, C, h/4, w/4) are resized to 256x256 and arg-maxed. Mask2Former: the
semantic map is arg-max over classes of sum_q softmax(class logits)[q, c] * sigmoid(mask logits)[q].
"""
from __future__ import annotations

import numpy as np

from uvd.pipelines import render
from uvd.pipelines.labelers import hf
from uvd.pipelines.labelers.base import Labeler, to_tensor

SEGFORMER_TYPES = ("segformer", "dpt", "beit", "mobilevit", "mobilevitv2", "upernet")
MASK2FORMER_TYPES = ("mask2former", "maskformer")
ADE20K_CLASSES = 150


class SegmentationLabeler(Labeler):
    """Options: `input_size` (model input side; default from the folder's preprocessor config, else 512)."""

    kind = "segmentation"

    def __init__(self, weights=None, device="auto", dtype="auto", batch_size=16, input_size: int | None = None):
        super().__init__(weights, device, dtype, batch_size, input_size=input_size)
        import torch
        from transformers import AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation

        self.torch_dtype = getattr(torch, self.dtype_name)
        config = hf.read_json(hf.require_path(weights, "the segmentation labeler") / "config.json")
        self.universal = config.get("model_type") in MASK2FORMER_TYPES
        auto_class = AutoModelForUniversalSegmentation if self.universal else AutoModelForSemanticSegmentation
        types = MASK2FORMER_TYPES if self.universal else SEGFORMER_TYPES
        self.model, config = hf.load_model(weights, auto_class, types, "the segmentation labeler", self.device, self.torch_dtype)
        self.pre = hf.preprocess(self.weights, config, default_size=512, size=input_size)
        self.num_classes = self.model.config.num_labels
        self.ade20k = self.num_classes == ADE20K_CLASSES
        if not self.ade20k and self.num_classes > render.IGNORE_LABEL:
            raise ValueError(f"weights: {self.weights / 'config.json'} has {self.num_classes} labels; at most 255 can be drawn")

    def label_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        """-> per image (256, 256) uint8 label values (ADE20K: class + 1; others: class)."""
        import torch
        import torch.nn.functional as F

        x = to_tensor(pixels, self.device, self.torch_dtype, self.pre.size, self.pre.mean, self.pre.std, self.pre.scale)
        size = pixels.shape[1:3]
        with torch.inference_mode():
            out = self.model(pixel_values=x)
            if self.universal:
                classes = out.class_queries_logits.float().softmax(-1)[..., :-1]  # (B, Q, C), the last is "no object"
                masks = F.interpolate(out.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
                scores = torch.einsum("bqc,bqhw->bchw", classes, masks)
            else:
                scores = F.interpolate(out.logits.float(), size=size, mode="bilinear", align_corners=False)
            classes = scores.argmax(dim=1)  # (B, 256, 256)
        values = classes + 1 if self.ade20k else classes
        return list(values.to(torch.uint8).cpu().numpy())

    def render(self, label: np.ndarray) -> np.ndarray:
        if self.ade20k:
            return render.render_segmentation(label, None, render.ADE20K_PALETTE)
        return render.render_segmentation(label)
