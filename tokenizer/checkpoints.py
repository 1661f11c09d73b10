"""Read VQGAN checkpoints in the three layouts `tokenizer.weights` accepts, and write them.

- uvd:       `config.json` (VQGANConfig fields) + `model.safetensors`, taming parameter names.
- open-muse: `VQGANModel.save_pretrained` folder: `config.json` (`_class_name: VQGANModel`) +
             `pytorch_model.bin` (a torch pickle, read with `weights_only=True`) or `model.safetensors`;
             taming parameter names, so the mapping is the identity.
- diffusers: `VQModel` folder (aMUSEd's `vqvae/`): `config.json` (`_class_name: VQModel`) +
             `diffusion_pytorch_model.safetensors` (or `.bin`); names mapped by `diffusers_name`.

Loading is exact: the config comes from the file, features we do not implement are refused
naming the key, and every tensor must map one to one with the right shape.

    uvd tokenizer convert SRC DST      # any layout -> uvd layout

`load_tokenizer` is the one entry point the stage, training and `uvd view` use; the bundled
demo tokenizer is package data (`demo_weights_dir`), so an installed wheel carries it too.
"""

from __future__ import annotations

import importlib.resources
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uvd.tokenizer.vqgan import CONFIG_FILE, VQGAN, WEIGHTS_FILE, VQGANConfig, load_state_dict_strict

OPEN_MUSE_CLASS = "VQGANModel"
DIFFUSERS_CLASS = "VQModel"
OPEN_MUSE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# open-muse VQGANModel.__init__ (register_to_config) keys; those not listed in _open_muse_config are refused.
OPEN_MUSE_KEYS = (
    "resolution", "num_channels", "hidden_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
    "no_attn_mid_block", "z_channels", "num_embeddings", "quantized_embed_dim", "dropout", "resample_with_conv",
    "commitment_cost",
)
# diffusers VQModel.__init__ keys.
DIFFUSERS_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "sample_size", "num_vq_embeddings", "norm_num_groups", "vq_embed_dim",
    "scaling_factor", "norm_type", "mid_block_add_attention", "lookup_from_codebook", "force_upcast",
)


# ---------------------------------------------------------------- configs


def _check_keys(d: dict, known: tuple[str, ...], what: str, path: Path) -> None:
    for key in d:
        if not key.startswith("_") and key not in known:
            raise ValueError(f"{path}: {what} config key {key!r} is not supported (known: {', '.join(known)})")


def _refuse(path: Path, key: str, value, why: str) -> None:
    raise ValueError(f"{path}: config {key}={value!r}: {why}; this VQGAN implements no such feature")


def open_muse_config(d: dict, path: Path = Path("config.json")) -> VQGANConfig:
    """open-muse VQGANModel config.json -> VQGANConfig (decoder has num_res_blocks + 1 blocks per level)."""
    _check_keys(d, OPEN_MUSE_KEYS, "open-muse VQGANModel", path)
    # open-muse's defaults, where the file leaves a key out.
    resolution = int(d.get("resolution", 256))
    mult = tuple(int(m) for m in d.get("channel_mult", (1, 1, 2, 2, 4)))
    z_channels = int(d.get("z_channels", 256))
    embed_dim = int(d.get("quantized_embed_dim", 256))
    # attention is added at every level whose resolution is listed (encoder and decoder see the same set)
    level_res = {resolution // 2**i for i in range(len(mult))}
    attn = [int(r) for r in d.get("attn_resolutions", (16,))]
    if level_res & set(attn):
        _refuse(path, "attn_resolutions", attn, "attention blocks at those resolutions")
    if not d.get("no_attn_mid_block", False):
        _refuse(path, "no_attn_mid_block", d.get("no_attn_mid_block", False), "the middle block has attention")
    if embed_dim != z_channels:
        _refuse(path, "quantized_embed_dim", embed_dim, f"differs from z_channels={z_channels}")
    if not d.get("resample_with_conv", True):
        _refuse(path, "resample_with_conv", False, "down/upsampling without convolutions")
    num_res_blocks = int(d.get("num_res_blocks", 2))
    return VQGANConfig(
        hidden_channels=int(d.get("hidden_channels", 128)), channel_mult=mult, num_res_blocks=num_res_blocks,
        num_res_blocks_decoder=num_res_blocks + 1, z_channels=z_channels,
        num_embeddings=int(d.get("num_embeddings", 1024)), resolution=resolution,
        num_channels=int(d.get("num_channels", 3)), norm_groups=32,  # open-muse's Normalize: GroupNorm(32)
    )


def to_open_muse_config(cfg: VQGANConfig) -> dict:
    if cfg.num_res_blocks_decoder != cfg.num_res_blocks + 1 or cfg.norm_groups != 32:
        raise ValueError("open-muse VQGANModel needs num_res_blocks_decoder = num_res_blocks + 1 and norm_groups = 32")
    return {
        "_class_name": OPEN_MUSE_CLASS, "_version": "0.0.1", "resolution": cfg.resolution,
        "num_channels": cfg.num_channels, "hidden_channels": cfg.hidden_channels, "channel_mult": list(cfg.channel_mult),
        "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": [], "no_attn_mid_block": True,
        "z_channels": cfg.z_channels, "num_embeddings": cfg.num_embeddings, "quantized_embed_dim": cfg.z_channels,
        "dropout": 0.0, "resample_with_conv": True, "commitment_cost": 0.25,
    }


def diffusers_config(d: dict, path: Path = Path("config.json")) -> VQGANConfig:
    """diffusers VQModel config.json -> VQGANConfig (decoder has layers_per_block + 1 resnets per level)."""
    _check_keys(d, DIFFUSERS_KEYS, "diffusers VQModel", path)
    channels = [int(c) for c in d.get("block_out_channels", (64,))]
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, (kind,)))
        if len(types) != len(channels) or any(t != kind for t in types):
            _refuse(path, key, types, f"only {len(channels)} x {kind} (one per block_out_channels entry) is implemented")
    if d.get("act_fn", "silu") != "silu":
        _refuse(path, "act_fn", d["act_fn"], "only silu")
    if d.get("norm_type", "group") != "group":
        _refuse(path, "norm_type", d["norm_type"], "only group norm")
    if d.get("mid_block_add_attention", True):
        _refuse(path, "mid_block_add_attention", d.get("mid_block_add_attention", True), "the middle block has attention")
    latent = int(d.get("latent_channels", 3))
    if d.get("vq_embed_dim") not in (None, latent):
        _refuse(path, "vq_embed_dim", d["vq_embed_dim"], f"differs from latent_channels={latent}")
    if int(d.get("in_channels", 3)) != int(d.get("out_channels", 3)):
        _refuse(path, "out_channels", d.get("out_channels"), "differs from in_channels")
    hidden = channels[0]
    if any(c % hidden for c in channels):
        _refuse(path, "block_out_channels", channels, f"not all multiples of the first ({hidden})")
    layers = int(d.get("layers_per_block", 1))
    return VQGANConfig(
        hidden_channels=hidden, channel_mult=tuple(c // hidden for c in channels), num_res_blocks=layers,
        num_res_blocks_decoder=layers + 1, z_channels=latent, num_embeddings=int(d.get("num_vq_embeddings", 256)),
        resolution=256,  # not in the file (sample_size is the latent side); SPEC.md's 256, only tokens_per_image uses it
        num_channels=int(d.get("in_channels", 3)), norm_groups=int(d.get("norm_num_groups", 32)),
    )


def to_diffusers_config(cfg: VQGANConfig) -> dict:
    if cfg.num_res_blocks_decoder != cfg.num_res_blocks + 1 or cfg.channel_mult[0] != 1:
        raise ValueError("diffusers VQModel needs num_res_blocks_decoder = num_res_blocks + 1 and channel_mult[0] = 1")
    levels = len(cfg.channel_mult)
    return {
        "_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.25.0", "act_fn": "silu",
        "block_out_channels": [cfg.hidden_channels * m for m in cfg.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "force_upcast": False, "in_channels": cfg.num_channels, "out_channels": cfg.num_channels,
        "latent_channels": cfg.z_channels, "layers_per_block": cfg.num_res_blocks, "lookup_from_codebook": True,
        "mid_block_add_attention": False, "norm_num_groups": cfg.norm_groups, "norm_type": "group",
        "num_vq_embeddings": cfg.num_embeddings, "sample_size": cfg.resolution // cfg.downsample_factor,
        "scaling_factor": 0.18215, "vq_embed_dim": None,
    }


# ---------------------------------------------------------------- parameter names

_RESNET_PART = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def diffusers_name(name: str, num_levels: int) -> str:
    """Our (taming / open-muse) parameter name -> the diffusers VQModel name of the same tensor.

    diffusers stores the decoder's up blocks deepest first, taming's `up` list shallowest first."""
    rules = (
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(.+)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PART[m[3]]}.{m[4]}"),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PART[m[3]]}.{m[4]}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PART[m[3]]}.{m[4]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"(quant_conv|post_quant_conv|quantize\.embedding)\.(.+)", lambda m: m[0]),
    )
    for pattern, rename in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return rename(m)
    raise AssertionError(f"no diffusers name for parameter {name!r}")  # our own model's names are all covered


def name_table(cfg: VQGANConfig, layout: str) -> dict[str, str]:
    """{our name: the name in `layout`} for every tensor of a model with this config."""
    with torch.device("meta"):
        names = list(VQGAN(cfg).state_dict())
    if layout in ("uvd", "open-muse"):
        return {n: n for n in names}
    if layout == "diffusers":
        return {n: diffusers_name(n, len(cfg.channel_mult)) for n in names}
    raise ValueError(f"unknown checkpoint layout {layout!r}; one of uvd, open-muse, diffusers")


# ---------------------------------------------------------------- files


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # A torch pickle from a download: weights_only refuses anything but tensors and plain containers.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused (not a plain tensor state dict; weights_only loading): {str(err)[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def detect_layout(path_dir: str | Path) -> tuple[str, Path, Path]:
    """-> (layout, config file, weights file) of a checkpoint folder; aMUSEd's repo root is followed into `vqvae/`."""
    path = Path(path_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer weights directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file() and (path / "vqvae" / CONFIG_FILE).is_file():
        path = path / "vqvae"
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ValueError(f"tokenizer weights directory {path} has no {CONFIG_FILE}")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config}: not valid JSON: {err}") from None
    cls = data.get("_class_name")
    if cls == OPEN_MUSE_CLASS:
        layout, candidates = "open-muse", OPEN_MUSE_WEIGHTS
    elif cls == DIFFUSERS_CLASS:
        layout, candidates = "diffusers", DIFFUSERS_WEIGHTS
    elif cls is None:
        layout, candidates = "uvd", (WEIGHTS_FILE,)
    else:
        raise ValueError(f"{config}: _class_name {cls!r} is not a VQGAN layout we read ({OPEN_MUSE_CLASS}, {DIFFUSERS_CLASS})")
    for name in candidates:
        if (path / name).is_file():
            return layout, config, path / name
    raise ValueError(f"tokenizer weights directory {path} ({layout} layout) has no {' or '.join(candidates)}")


def load_checkpoint(path_dir: str | Path) -> tuple[VQGAN, VQGANConfig, str]:
    """Any of the three layouts -> (model on CPU in eval mode, config, layout)."""
    layout, config_path, weights_path = detect_layout(path_dir)
    data = json.loads(config_path.read_text())
    if layout == "open-muse":
        cfg = open_muse_config(data, config_path)
    elif layout == "diffusers":
        cfg = diffusers_config(data, config_path)
    else:
        cfg = VQGANConfig.from_dict(data)
    state = _read_weights(weights_path)
    table = name_table(cfg, layout)
    ours = {}
    for our_name, file_name in table.items():
        if file_name not in state:
            raise ValueError(f"{weights_path}: missing tensor {file_name!r} (our {our_name!r})")
        ours[our_name] = state[file_name]
    unexpected = sorted(set(state) - set(table.values()))
    if unexpected:
        raise ValueError(f"{weights_path}: tensors the config does not account for: {unexpected[:5]}")
    with torch.device("meta"):  # no random init for tensors the file replaces
        model = VQGAN(cfg)
    for our_name, expected in model.state_dict().items():
        if tuple(ours[our_name].shape) != tuple(expected.shape):
            raise ValueError(
                f"{weights_path}: tensor {table[our_name]!r} has shape {tuple(ours[our_name].shape)}, "
                f"the config in {config_path.name} expects {tuple(expected.shape)}"
            )
    load_state_dict_strict(model, ours)
    return model.eval(), cfg, layout


def save_checkpoint_dir(model: VQGAN, path_dir: str | Path, layout: str = "uvd") -> Path:
    """Write `model` in `layout` (uvd, open-muse, diffusers) with the table `load_checkpoint` reads."""
    cfg = model.config
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    table = name_table(cfg, layout)
    state = {table[k]: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if layout == "uvd":
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        config = cfg.to_dict()
    elif layout == "open-muse":
        torch.save(state, path / "pytorch_model.bin")  # what open-muse's save_pretrained writes
        config = to_open_muse_config(cfg)
    else:
        save_file(state, str(path / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})
        config = to_diffusers_config(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def convert(src: str | Path, dst: str | Path) -> tuple[str, VQGANConfig]:
    """`uvd tokenizer convert`: any layout -> uvd layout in dst. Returns (source layout, config)."""
    model, cfg, layout = load_checkpoint(src)
    save_checkpoint_dir(model, dst, "uvd")
    return layout, cfg


def load_tokenizer(path_dir: str | Path) -> tuple[VQGAN, VQGANConfig]:
    """Read a tokenizer folder in any of the three layouts -> (model on CPU in eval mode, config)."""
    model, cfg, _ = load_checkpoint(path_dir)
    return model, cfg


def demo_weights_dir() -> Path:
    """The bundled demo tokenizer (`small` preset trained on the demo world): tokenizer/weights/demo-small."""
    return Path(str(importlib.resources.files("uvd.tokenizer").joinpath("weights", "demo-small")))
