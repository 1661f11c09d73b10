"""Tokenizer training: recipe checks, losses, dead-code restarts, and a tiny CPU run through the CLI
that checkpoints, resumes and writes a loadable tokenizer folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import uvd.pipelines  # noqa: F401  (registers the sources)
from uvd.tokenizer.losses import PatchDiscriminator, PerceptualLoss, discriminator_loss, generator_loss
from uvd.tokenizer.train import SourceImages, is_held_out, load_train_config, restart_dead_codes
from uvd.tokenizer.checkpoints import load_tokenizer
from uvd.tokenizer.vqgan import build_vqgan
from uvd.cli import main
from uvd.demo.world_annotated import build_photo_folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_train")
    build_photo_folder(root / "photos", num_images=6, seed=0)
    path = root / "tok.yaml"
    path.write_text(yaml.safe_dump({
        "data": [{"recipe": "recipes/derived_pairs.yaml", "inputs": str(root / "photos")}],
        "out": str(root / "run"),
        "model": "test",
        "holdout_share": 0.2,
        "train": {"steps": 6, "batch_size": 2, "crop_size": 32, "gan_start": 3, "restart_every": 2,
                  "checkpoint_every": 3, "log_every": 1, "disc_channels": 8, "disc_layers": 2, "num_threads": 1},
    }))
    return path


def test_train_checkpoints_resumes_and_exports(recipe, capsys):
    assert main(["tokenizer", "train", str(recipe)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    out = recipe.parent / "run"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert "d_loss" in log[-1] and "d_loss" not in log[1]  # the discriminator starts at gan_start
    assert any("restarted_codes" in r for r in log)
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["images"] > 0 and 0 < heldout["used_codes"] <= 8192
    model, cfg = load_tokenizer(out / "tokenizer")
    assert cfg.hidden_channels == 8  # the "test" preset
    # the held-out PSNR, recomputed here: the exported tokenizer on the held-out images, uint8 round trip
    _, held = SourceImages(load_train_config(recipe).data, 0.2, "heldout").load_all()
    assert len(held) == heldout["images"]
    with torch.no_grad():
        x = torch.from_numpy(held).permute(0, 3, 1, 2).double() / 255.0
        rec = (model.eval().decode(model.encode(x.float())).double().clamp(0, 1) * 255.0).round() / 255.0
    mse = ((rec - x) ** 2).flatten(1).mean(1).numpy()
    assert heldout["psnr"] == pytest.approx(float(np.mean(-10.0 * np.log10(mse))), abs=1e-3)
    # resume: more steps continue from step 6, not from scratch
    assert main(["tokenizer", "train", str(recipe), "--set", "train.steps=8"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_recipe_errors_name_the_field(recipe):
    with pytest.raises(ValueError, match="train.crop_size"):
        load_train_config(recipe, ["train.crop_size=40"])
    with pytest.raises(ValueError, match="bogus"):
        load_train_config(recipe, ["bogus=1"])
    with pytest.raises(ValueError, match="perceptual_weights"):
        load_train_config(recipe, ["train.perceptual_weight=1.0"])
    with pytest.raises(ValueError, match="preset"):
        load_train_config(recipe, ["model=huge"])


def test_shipped_tokenizer_recipes_load():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "recipes" / "tokenizer").glob("*.yaml"))
    assert paths
    for path in paths:
        load_train_config(path)


def test_dead_code_restart_uses_encoder_outputs():
    model = build_vqgan("test", seed=0)
    usage = torch.zeros(model.config.num_embeddings, dtype=torch.long)
    usage[:10] = 5
    before = model.quantize.embedding.weight.detach().clone()
    latents = torch.randn(2, model.config.z_channels, 4, 4) * 3.0
    restarted = restart_dead_codes(model, usage, latents, 1, torch.Generator().manual_seed(0))
    after = model.quantize.embedding.weight.detach()
    assert restarted == model.config.num_embeddings - 10
    assert torch.equal(after[:10], before[:10])
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    nearest = torch.cdist(after[10:], flat).min(1).values
    assert nearest.max() < 0.5  # next to an encoder output (the latents are ~12 apart; the noise is 1% of their std)


def test_gan_losses_and_discriminator():
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert discriminator_loss(real, fake, "hinge") == 0  # both beyond the margin
    assert generator_loss(fake, "hinge") == 2.0
    assert discriminator_loss(real, fake, "non_saturating") < discriminator_loss(fake, real, "non_saturating")
    logits = PatchDiscriminator(8, 2)(torch.rand(2, 3, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.shape[2] > 1  # a grid of patch logits


def test_perceptual_loss_needs_user_weights(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        PerceptualLoss(tmp_path / "lpips_vgg16.safetensors")


def test_holdout_split_is_stable():
    keys = [f"laion:{i:05d}" for i in range(2000)]
    held = [k for k in keys if is_held_out(k, 0.1)]
    # the same split in another process with another hash seed (no use of Python's salted hash())
    code = "from uvd.tokenizer.train import is_held_out; print(sum(1 << i for i in range(2000) if is_held_out(f'laion:{i:05d}', 0.1)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    other = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert [k for i, k in enumerate(keys) if other >> i & 1] == held
    assert 150 < len(held) < 250
    # a larger share only adds keys; the extremes take none and all
    assert set(held) < {k for k in keys if is_held_out(k, 0.2)}
    assert not any(is_held_out(k, 0.0) for k in keys) and all(is_held_out(k, 1.0) for k in keys)
