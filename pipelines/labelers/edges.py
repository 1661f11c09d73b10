"""Edges labeler: Canny (model-free, the default) or HED from the user's weights.

HED is the network ControlNet's annotator uses (`ControlNetHED.pth`, a state dict; a
`.safetensors` file with the same keys works too): five VGG-style blocks, each with a 1x1
side projection; the side outputs are resized to the image, averaged and passed through a
sigmoid -> a soft edge map in [0, 1]. Its input is RGB in 0..255 minus a learned mean (`norm`).
"""
from __future__ import annotations

import cv2
import numpy as np

from uvd.pipelines import render
from uvd.pipelines.labelers.base import Labeler, require_path


def _hed_network():
    import torch
    from torch import nn

    class Block(nn.Module):
        """`num_convs` 3x3 conv + ReLU (after an optional 2x2 max-pool), and a 1x1 side projection."""

        def __init__(self, in_channels: int, channels: int, num_convs: int):
            super().__init__()
            self.convs = nn.Sequential(*[nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)])
            self.projection = nn.Conv2d(channels, 1, 1)

        def forward(self, x, pool: bool):
            if pool:
                x = nn.functional.max_pool2d(x, 2, 2)
            for conv in self.convs:
                x = torch.relu(conv(x))
            return x, self.projection(x)

    class HED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            widths = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
            for i, (c_in, c, n) in enumerate(widths, start=1):
                setattr(self, f"block{i}", Block(c_in, c, n))

        def forward(self, x):  # (B, 3, H, W) RGB 0..255 -> (B, H, W) edge probability
            h, sides = x - self.norm, []
            for i in range(1, 6):
                h, side = getattr(self, f"block{i}")(h, pool=i > 1)
                sides.append(nn.functional.interpolate(side.float(), size=x.shape[2:], mode="bilinear", align_corners=False))
            return torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1))

    return HED()


def load_state_dict(path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class EdgesLabeler(Labeler):
    """Options: `method` canny | hed; canny: `low` (100), `high` (200); hed: `weights` = the state-dict file."""

    kind = "edges"

    def __init__(self, weights=None, device="auto", dtype="auto", batch_size=16, method: str = "canny", low: int = 100, high: int = 200):
        options = {"method": method, **({"low": low, "high": high} if method == "canny" else {})}
        super().__init__(weights if method == "hed" else None, device, dtype, batch_size, **options)
        if method not in ("canny", "hed"):
            raise ValueError(f"options.method: {method!r} is not one of canny, hed")
        if method == "canny":
            if not 0 <= low <= high:
                raise ValueError(f"options.low: must be in 0..high, got {low}")
            self.net = None
            return
        import torch

        path = require_path(weights, "the HED edges labeler (ControlNetHED.pth)")
        if not path.is_file():
            raise ValueError(f"weights: {path} is a folder; HED needs its state-dict file (e.g. ControlNetHED.pth)")
        try:
            state = load_state_dict(path)
        except (RuntimeError, OSError, ValueError) as err:
            raise ValueError(f"weights: {path} is not a torch state dict: {str(err)[:200]}") from None
        net = _hed_network()
        missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
        if missing or unexpected:
            raise ValueError(f"weights: {path} is not HED's state dict (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"weights: {path} does not fit HED: {str(err)[:200]}") from None
        self.torch_dtype = getattr(torch, self.dtype_name)
        self.net = net.to(self.device, self.torch_dtype).eval()

    def label_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        """-> per image (256, 256): uint8 Canny edges (0/255), or float32 HED probabilities in [0, 1]."""
        if self.net is None:
            low, high = self.options["low"], self.options["high"]
            return [cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), low, high) for image in pixels]
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).to(self.torch_dtype)
        with torch.inference_mode():
            edges = self.net(x)
        return list(edges.float().cpu().numpy())

    def render(self, label: np.ndarray) -> np.ndarray:
        return render.render_edges(label)
