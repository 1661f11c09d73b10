"""The VQGAN's configuration and its named presets (`lvm`, `maskgit`, `small`, `test`), without torch.

Recipes name a preset in `tokenizer.config`; checking one (`uvd validate`) needs no model, so this
module imports nothing heavy. The model itself is in tokenizer/vqgan.py.
"""

from __future__ import annotations

import dataclasses

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    num_res_blocks: int = 2
    num_res_blocks_decoder: int = 3
    z_channels: int = 64
    num_embeddings: int = 8192
    resolution: int = 256
    num_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult:
            raise ValueError("VQGANConfig.channel_mult must name at least one level")
        for mult in self.channel_mult:
            if (self.hidden_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"VQGANConfig: hidden_channels*channel_mult ({self.hidden_channels}*{mult}) "
                    f"is not divisible by norm_groups ({self.norm_groups})"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"VQGANConfig.resolution {self.resolution} is not a multiple of the "
                f"downsample factor {self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return (self.resolution // self.downsample_factor) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown VQGANConfig key {key!r}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, VQGANConfig] = {
    # Released LVM tokenizer (open-muse vqgan-f16-8192-laion), ~146M parameters.
    "lvm": VQGANConfig(),
    # Paper-era MaskGIT trunk, with LVM's codebook (8192 x 64).
    "maskgit": VQGANConfig(channel_mult=(1, 1, 2, 2, 4), num_res_blocks_decoder=2),
    # CPU demo size: f16 and 8192 codes kept, trunk shrunk (hidden 16, 1 res block) so a
    # 256x256 encode takes ~26 ms on 2 CPU cores (batch 16, channels_last).
    "small": VQGANConfig(
        hidden_channels=16, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
        num_res_blocks_decoder=1, norm_groups=8,
    ),
    # Unit tests.
    "test": VQGANConfig(
        hidden_channels=8, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
        num_res_blocks_decoder=1, z_channels=16, norm_groups=4,
    ),
}


def resolve_config(config: VQGANConfig | dict | str) -> VQGANConfig:
    """A config object, a dict of its fields, or a preset name -> VQGANConfig."""
    if isinstance(config, VQGANConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {config!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[config]
    if isinstance(config, dict):
        return VQGANConfig.from_dict(config)
    raise ValueError(f"tokenizer config must be a preset name, a dict or a VQGANConfig, got {type(config)}")
