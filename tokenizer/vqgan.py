"""VQGAN image tokenizer (f = 16, 8192 codes): 256x256 RGB in [0, 1] -> 256 token ids.

Plain PyTorch with the taming / open-muse `VQGANModel` parameter names (`encoder.down.0.block.0.conv1`,
`quantize.embedding`, ...) so released LVM tokenizer weights load by name. Weights travel as a
directory with `config.json` + `model.safetensors` (`save_tokenizer` here; `load_tokenizer` in
tokenizer/checkpoints.py, which also reads open-muse and diffusers checkpoint folders).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from uvd.tokenizer.config import CONFIG_FILE, PRESETS, WEIGHTS_FILE, VQGANConfig, resolve_config  # noqa: F401  (re-exported)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only, so (H, W) -> (H/2, W/2) exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        hidden, mult, groups = cfg.hidden_channels, cfg.channel_mult, cfg.norm_groups
        in_mult = (1,) + mult
        self.conv_in = nn.Conv2d(cfg.num_channels, hidden, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(mult)):
            level = nn.Module()
            block_in, block_out = hidden * in_mult[i], hidden * mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if i != len(mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        mid_channels = hidden * mult[-1]
        self.mid = MidBlock(mid_channels, groups)
        self.norm_out = _norm(mid_channels, groups)
        self.conv_out = nn.Conv2d(mid_channels, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        hidden, mult, groups = cfg.hidden_channels, cfg.channel_mult, cfg.norm_groups
        block_in = hidden * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, groups)
        levels = []
        # Built from the deepest level up, stored in level order 0..n-1 (open-muse `up.insert(0, ...)`).
        for i in reversed(range(len(mult))):
            level = nn.Module()
            block_out = hidden * mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks_decoder):
                level.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.num_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, h*w) int64 ids of the nearest code (squared L2)."""
        # Distances in fp32 even under autocast, so ids do not depend on the trunk's dtype.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, C)
            codebook = self.embedding.weight.float()  # (K, C)
            # ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code, and leaving it out
            # avoids cancellation when ||z|| is much larger than the codes.
            dist = (codebook * codebook).sum(1) - 2.0 * flat @ codebook.t()  # (B*h*w, K)
            ids = dist.argmin(dim=1)
        return ids.view(z.shape[0], -1)

    def lookup(self, ids: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w) ids -> (B, C, h, w) code vectors."""
        codes = self.embedding(ids.reshape(ids.shape[0], height, width))  # (B, h, w, C)
        return codes.permute(0, 3, 1, 2).contiguous()


class VQGANOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W), unclamped
    ids: torch.Tensor  # (B, h*w) int64
    latents: torch.Tensor  # (B, C, h, w) encoder output after quant_conv
    quantized: torch.Tensor  # (B, C, h, w) code vectors, gradient flows to the codebook
    quantized_st: torch.Tensor  # (B, C, h, w) straight-through: value of codes, gradient to the encoder
    loss: torch.Tensor  # codebook + beta * commitment


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        self.quantize = VectorQuantizer(config.num_embeddings, config.z_channels)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, z_channels, H/f, W/f) pre-quantization latents."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.num_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"VQGAN expects (B, {self.config.num_channels}, H, W) with H, W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, H/f * W/f) int64 token ids."""
        return self.quantize.nearest(self.encode_latents(x))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h*w) or (B, h, w) ids -> (B, 3, H, W) float in [0, 1]; a flat grid must be square."""
        if ids.ndim == 3:
            height, width = ids.shape[1:]
        else:
            height = width = math.isqrt(ids.shape[1])
            if height * width != ids.shape[1]:
                raise ValueError(f"cannot decode {ids.shape[1]} tokens as a square grid; pass (B, h, w)")
        codes = self.quantize.lookup(ids.long(), height, width)
        return self.decode_codes(codes).clamp(0.0, 1.0)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(codes))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        z = self.encode_latents(x)
        ids = self.quantize.nearest(z)
        z_q = self.quantize.lookup(ids, z.shape[2], z.shape[3]).to(z.dtype)
        loss = F.mse_loss(z_q, z.detach()) + self.quantize.beta * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()
        return VQGANOutput(self.decode_codes(z_st), ids, z, z_q, z_st, loss)


def build_vqgan(config: VQGANConfig | dict | str, seed: int = 0) -> VQGAN:
    """An untrained VQGAN whose weights depend only on (config, seed): same seed, same bits on CPU."""
    cfg = resolve_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            return VQGAN(cfg)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every state-dict tensor, names sorted."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tokenizer(model: VQGAN, config: VQGANConfig | dict | str, path_dir: str | Path) -> None:
    """Write `config.json` and `model.safetensors` into path_dir (created if missing)."""
    cfg = resolve_config(config)
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_state_dict_strict(model: VQGAN, state: dict[str, torch.Tensor]) -> VQGAN:
    """Load `state` into `model`; every tensor must be present with the model's shape."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"tokenizer weights are missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"tokenizer tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the config expects {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"tokenizer weights have tensors the config does not: {unexpected[:5]}")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
