"""Pose labeler: an MMPose model (config + checkpoint), drawn as OpenPose-style skeletons.

MMPose is an optional extra (`make setup EXTRAS=pose`): it needs numpy < 2.4 and packages that
do not install with plain pip (see README, "Labelers"). Bottom-up models find every person;
top-down models see the whole image as one person box. Keypoints scoring below `min_score` are
not drawn; MMPose runs in float32 whatever `dtype` says.
"""
from __future__ import annotations

import numpy as np

from uvd.pipelines import render
from uvd.pipelines.labelers.base import Labeler, require_path


class PoseLabeler(Labeler):
    """Options: `config` (the MMPose config file, required), `mode` bottomup | topdown,
    `min_score` (0.3), `background` black | image."""

    kind = "pose"

    def __init__(self, weights=None, device="auto", dtype="auto", batch_size=16, config: str | None = None,
                 mode: str = "bottomup", min_score: float = 0.3, background: str = "black"):
        super().__init__(weights, device, dtype, batch_size, mode=mode, min_score=min_score, background=background)
        if mode not in ("bottomup", "topdown"):
            raise ValueError(f"options.mode: {mode!r} is not one of bottomup, topdown")
        if background not in ("black", "image"):
            raise ValueError(f"options.background: {background!r} is not one of black, image")
        checkpoint = require_path(weights, "the pose labeler (an MMPose checkpoint .pth)")
        config_path = require_path(config, "the pose labeler (an MMPose config .py)", field="options.config")
        self.options["config_sha256"] = _file_sha256(config_path)
        try:
            from mmpose.apis import inference_bottomup, inference_topdown, init_model
        except ImportError as err:
            raise ValueError(f"kind: pose needs MMPose, which is not installed ({err}); run `make setup EXTRAS=pose`") from None
        self._infer = inference_bottomup if mode == "bottomup" else inference_topdown
        try:
            self.model = init_model(str(config_path), str(checkpoint), device=self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"weights: {checkpoint} with {config_path} does not load in MMPose: {str(err)[:300]}") from None

    def label_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        """-> per image (N, 17, 3) float32 COCO keypoints (x, y, v), v = 2 where the score passes."""
        out = []
        for image in pixels:
            bgr = np.ascontiguousarray(image[..., ::-1])  # MMPose reads arrays as BGR
            results = self._infer(self.model, bgr) if self.options["mode"] == "bottomup" else self._infer(self.model, bgr, None)
            people = []
            for result in results:
                inst = result.pred_instances
                keypoints, scores = np.asarray(inst.keypoints, np.float32), np.asarray(inst.keypoint_scores, np.float32)
                for kp, score in zip(keypoints, scores):
                    people.append(np.concatenate([kp[:, :2], np.where(score >= self.options["min_score"], 2, 0)[:, None]], axis=1))
            label = np.stack(people).astype(np.float32) if people else np.zeros((0, 17, 3), np.float32)
            out.append(label)
        return out

    def render(self, label: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        return draw_people(label, 256, 256, image if self.options["background"] == "image" else None)

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [self.render(label, image) for label, image in zip(self.label(pixels), pixels)]


def draw_people(people: np.ndarray, height: int, width: int, background: np.ndarray | None = None) -> np.ndarray:
    """(N, 17, 3) keypoints (x, y, v) -> OpenPose skeletons; joints outside the image are not drawn."""
    kp = np.array(people, np.float64).reshape(-1, 17, 3)
    outside = (kp[..., 0] < 0) | (kp[..., 1] < 0) | (kp[..., 0] > width - 1) | (kp[..., 1] > height - 1)
    kp[..., 2] = np.where(outside, 0, kp[..., 2])
    kp[..., :2] = np.where(outside[..., None], 0, kp[..., :2])
    return render.render_pose([p.reshape(-1).tolist() for p in kp], height, width, background)


def _file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
