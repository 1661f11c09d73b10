"""Checkpoint layouts: open-muse VQGANModel and diffusers VQModel folders load exactly, and the tokens our
model makes from them equal those of a plain reference forward pass written here from the file's names."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from uvd.tokenizer.checkpoints import (
    convert,
    detect_layout,
    diffusers_config,
    load_checkpoint,
    open_muse_config,
    save_checkpoint_dir,
)
from uvd.tokenizer.encode import ImageTokenizer
from uvd.tokenizer.checkpoints import load_tokenizer
from uvd.tokenizer.vqgan import PRESETS, VQGANConfig, build_vqgan, weights_sha256

# The released LVM tokenizer's open-muse config.json, and aMUSEd's vqvae/config.json (the same weights).
LVM_OPEN_MUSE = {
    "_class_name": "VQGANModel", "_version": "0.0.1", "attn_resolutions": [], "channel_mult": [1, 2, 2, 4, 6],
    "commitment_cost": 0.25, "dropout": 0.0, "hidden_channels": 128, "no_attn_mid_block": True, "num_channels": 3,
    "num_embeddings": 8192, "num_res_blocks": 2, "quantized_embed_dim": 64, "resample_with_conv": True,
    "resolution": 256, "z_channels": 64,
}
AMUSED_VQVAE = {
    "_class_name": "VQModel", "_diffusers_version": "0.25.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768], "down_block_types": ["DownEncoderBlock2D"] * 5,
    "force_upcast": False, "in_channels": 3, "latent_channels": 64, "layers_per_block": 2,
    "lookup_from_codebook": True, "mid_block_add_attention": False, "norm_num_groups": 32, "norm_type": "group",
    "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 32, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 5, "vq_embed_dim": None,
}
# Tiny, but with what the layouts need: 32 norm groups, decoder = encoder blocks + 1, channel change, 3 levels.
# (resolution 256: diffusers configs do not record it; tests feed 32x32 images, which any f=4 model encodes.)
TINY = VQGANConfig(hidden_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, num_res_blocks_decoder=2,
                   z_channels=8, num_embeddings=64, resolution=256, norm_groups=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_vqgan(TINY, seed=3)
    with torch.no_grad():  # random weights everywhere, norms included, codes on the latents' scale
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        x = torch.rand(4, 3, 32, 32)
        z = m.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, TINY.z_channels)
        m.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:64]] + 0.05 * torch.randn(64, TINY.z_channels))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- reference forward passes


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride, padding)


def _resnet(x, sd, p, shortcut):
    h = _conv(F.silu(_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = _conv(F.silu(_gn(h, sd, p + ".norm2")), sd, p + ".conv2")
    if f"{p}.{shortcut}.weight" in sd:
        x = _conv(x, sd, f"{p}.{shortcut}", padding=0)
    return x + h


def _down(h, sd, p):
    return _conv(F.pad(h, (0, 1, 0, 1)), sd, p, stride=2, padding=0)


def _up(h, sd, p):
    return _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, p)


def _blocks(sd, prefix):
    """Indices i with `prefix.{i}.` in the file, in order."""
    found = {int(k[len(prefix) + 1:].split(".")[0]) for k in sd if k.startswith(prefix + ".")}
    return sorted(found)


def _quantize(z, sd):
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    codes = sd["quantize.embedding.weight"].double()
    dist = (flat**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * flat @ codes.t()
    return dist.argmin(1).view(z.shape[0], -1)


def _codes(ids, sd):
    side = int(ids.shape[1] ** 0.5)
    return sd["quantize.embedding.weight"][ids].view(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)


def taming_encode(sd, x):
    h = _conv(x, sd, "encoder.conv_in")
    for i in _blocks(sd, "encoder.down"):
        for j in _blocks(sd, f"encoder.down.{i}.block"):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}", "nin_shortcut")
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = _down(h, sd, f"encoder.down.{i}.downsample.conv")
    h = _resnet(_resnet(h, sd, "encoder.mid.block_1", "nin_shortcut"), sd, "encoder.mid.block_2", "nin_shortcut")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _quantize(_conv(h, sd, "quant_conv", padding=0), sd)


def taming_decode(sd, ids):
    h = _conv(_conv(_codes(ids, sd), sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = _resnet(_resnet(h, sd, "decoder.mid.block_1", "nin_shortcut"), sd, "decoder.mid.block_2", "nin_shortcut")
    for i in reversed(_blocks(sd, "decoder.up")):  # taming: up[0] is the full-resolution level
        for j in _blocks(sd, f"decoder.up.{i}.block"):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}", "nin_shortcut")
        if f"decoder.up.{i}.upsample.conv.weight" in sd:
            h = _up(h, sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def diffusers_encode(sd, x):
    h = _conv(x, sd, "encoder.conv_in")
    for i in _blocks(sd, "encoder.down_blocks"):
        for j in _blocks(sd, f"encoder.down_blocks.{i}.resnets"):
            h = _resnet(h, sd, f"encoder.down_blocks.{i}.resnets.{j}", "conv_shortcut")
        if f"encoder.down_blocks.{i}.downsamplers.0.conv.weight" in sd:
            h = _down(h, sd, f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for j in _blocks(sd, "encoder.mid_block.resnets"):
        h = _resnet(h, sd, f"encoder.mid_block.resnets.{j}", "conv_shortcut")
    h = _conv(F.silu(_gn(h, sd, "encoder.conv_norm_out")), sd, "encoder.conv_out")
    return _quantize(_conv(h, sd, "quant_conv", padding=0), sd)


def diffusers_decode(sd, ids):
    h = _conv(_conv(_codes(ids, sd), sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    for j in _blocks(sd, "decoder.mid_block.resnets"):
        h = _resnet(h, sd, f"decoder.mid_block.resnets.{j}", "conv_shortcut")
    for i in _blocks(sd, "decoder.up_blocks"):  # diffusers: up_blocks[0] is the deepest level
        for j in _blocks(sd, f"decoder.up_blocks.{i}.resnets"):
            h = _resnet(h, sd, f"decoder.up_blocks.{i}.resnets.{j}", "conv_shortcut")
        if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in sd:
            h = _up(h, sd, f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.conv_norm_out")), sd, "decoder.conv_out")


# ---------------------------------------------------------------- tests


def test_real_configs_map_to_the_lvm_preset():
    assert open_muse_config(LVM_OPEN_MUSE) == PRESETS["lvm"]
    assert diffusers_config(AMUSED_VQVAE) == PRESETS["lvm"]


@pytest.mark.parametrize("layout", ["open-muse", "diffusers"])
def test_layout_tokens_match_reference(model, images, tmp_path, layout):
    folder = save_checkpoint_dir(model, tmp_path / layout, layout)
    if layout == "open-muse":
        assert (folder / "pytorch_model.bin").is_file()
        sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
        assert "encoder.down.0.block.0.conv1.weight" in sd and "quantize.embedding.weight" in sd
        encode, decode = taming_encode, taming_decode
    else:
        sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in sd  # deepest level first
        assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in sd
        assert "encoder.down_blocks.2.resnets.0.conv_shortcut.weight" in sd
        encode, decode = diffusers_encode, diffusers_decode
    loaded, cfg = load_tokenizer(folder)
    assert cfg == TINY
    with torch.no_grad():
        ids = loaded.encode(images)
        ref_ids = encode(sd, images)
        assert len(torch.unique(ids)) > 8  # the comparison means something
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(loaded.decode_codes(loaded.quantize.lookup(ids, 8, 8)), decode(sd, ids),
                                   atol=1e-4, rtol=1e-4)
    assert weights_sha256(loaded) == weights_sha256(model)


def test_convert_and_pipeline_accept_every_layout(model, tmp_path):
    from uvd.cli import main

    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = None
    for layout in ("open-muse", "diffusers"):
        src = save_checkpoint_dir(model, tmp_path / "src" / layout / "vqvae", layout).parent  # aMUSEd repo root
        assert detect_layout(src)[0] == layout
        assert main(["tokenizer", "convert", str(src), str(tmp_path / f"ours-{layout}")]) == 0
        for folder in (src, tmp_path / f"ours-{layout}"):
            tokens = ImageTokenizer(None, weights=str(folder), device="cpu").encode_pixels(pixels)
            expected = tokens if expected is None else expected
            assert np.array_equal(tokens, expected)
    assert detect_layout(tmp_path / "ours-diffusers")[0] == "uvd"
    assert convert(tmp_path / "ours-diffusers", tmp_path / "again") == ("uvd", TINY)


@pytest.mark.parametrize("key, value", [
    ("attn_resolutions", [16]), ("no_attn_mid_block", False), ("quantized_embed_dim", 32), ("use_fancy_norm", True),
])
def test_open_muse_config_refuses_what_we_do_not_implement(key, value):
    with pytest.raises(ValueError, match=key):
        open_muse_config({**LVM_OPEN_MUSE, key: value})
    assert open_muse_config({**LVM_OPEN_MUSE, "attn_resolutions": [512]}) == PRESETS["lvm"]  # no level that size


def test_open_muse_default_mid_attention_is_refused():
    config = dict(LVM_OPEN_MUSE)
    del config["no_attn_mid_block"]
    with pytest.raises(ValueError, match="no_attn_mid_block"):
        open_muse_config(config)


@pytest.mark.parametrize("key, value", [
    ("mid_block_add_attention", True), ("vq_embed_dim", 32), ("norm_type", "spatial"), ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]), ("some_new_key", 1),
])
def test_diffusers_config_refuses_what_we_do_not_implement(key, value):
    with pytest.raises(ValueError, match=key):
        diffusers_config({**AMUSED_VQVAE, key: value})


def test_tensor_mismatches_are_named(model, tmp_path):
    folder = save_checkpoint_dir(model, tmp_path / "d", "diffusers")
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    name = "decoder.up_blocks.1.resnets.0.conv1.weight"
    save_file({**state, name: torch.zeros(3, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match=name):
        load_checkpoint(folder)
    extra = "encoder.mid_block.attentions.0.to_q.weight"
    save_file({**state, extra: torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=extra):
        load_checkpoint(folder)
    del state["quantize.embedding.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        load_checkpoint(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(model, tmp_path):
    folder = save_checkpoint_dir(model, tmp_path / "m", "open-muse")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(folder)


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LVM_OPEN_MUSE))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_tokenizer(tmp_path)
