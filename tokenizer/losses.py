"""Losses for training the VQGAN: PatchGAN discriminator, hinge / non-saturating GAN losses, and an
optional LPIPS-style perceptual loss whose weights the user provides (nothing is downloaded).

Used by `tokenizer/train.py` (`uvd tokenizer train RECIPE`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming `NLayerDiscriminator`): (B, 3, H, W) in [0, 1] -> (B, 1, h, w) logits."""

    def __init__(self, channels: int = 64, num_layers: int = 3, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, channels * mult // 4), channels * mult),  # BatchNorm in taming; GN is DDP-safe
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x * 2.0 - 1.0)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    raise ValueError(f"gan loss must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"gan loss must be 'hinge' or 'non_saturating', got {kind!r}")


# VGG16 `features` layout (torchvision indices), and the ReLU outputs LPIPS compares.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualLoss(nn.Module):
    """LPIPS (Zhang et al. 2018, VGG variant) from a user-provided weights file.

    The file (safetensors, or a torch state dict read with `weights_only=True`) holds torchvision's
    VGG16 trunk as `features.{i}.weight/bias` and LPIPS's linear heads as `lin{k}.model.1.weight`
    (the names of the `lpips` package, so its `vgg.pth` merged with torchvision's vgg16 loads).
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(
                f"perceptual loss weights {str(path)!r} not found: give train.perceptual_weights a file with VGG16 "
                "`features.*` and LPIPS `lin*.model.1.weight` tensors, or set train.perceptual_weight: 0"
            )
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        state = _read_state(path)
        mapped = {k: v for k, v in state.items() if k.startswith("features.")}
        for k in range(len(_LPIPS_CHANNELS)):
            name = f"lin{k}.model.1.weight"
            if name not in state:
                raise ValueError(f"perceptual loss weights {path} have no tensor {name!r}")
            mapped[f"lins.{k}.weight"] = state[name]
        expected = self.state_dict()
        for name, tensor in expected.items():
            if name not in mapped:
                raise ValueError(f"perceptual loss weights {path} have no tensor {name!r}")
            if tuple(mapped[name].shape) != tuple(tensor.shape):
                raise ValueError(f"perceptual loss tensor {name!r} has shape {tuple(mapped[name].shape)}, expected {tuple(tensor.shape)}")
        self.load_state_dict({k: mapped[k].float() for k in expected})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x * 2.0 - 1.0) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                taps.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
            if i == _LPIPS_TAPS[-1]:
                break
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between (B, 3, H, W) images in [0, 1]."""
        total = x.new_zeros(())
        for lin, a, b in zip(self.lins, self._taps(x), self._taps(y)):
            total = total + lin((a - b) ** 2).mean()
        return total


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state
