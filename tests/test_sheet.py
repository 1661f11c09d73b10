"""The analogy/sequence sheet of `uvd prompt`: a title naming the task, the model (folder, size,
training steps) and the tokenizer (id, trained or not), above the image rows."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

import uvd.tokenizer  # noqa: F401  (registers the tokenizer stage)
from uvd.model.config import ModelConfig
from uvd.model.llama import LLaMA
from uvd.model.prompt import contact_sheet, sheet_title
from uvd.tokenizer.encode import ImageTokenizer


def test_title_names_task_model_steps_and_tokenizer(tmp_path):
    model = LLaMA(ModelConfig(dim=64, num_layers=2, num_heads=4, max_seq_len=512))
    params = sum(p.numel() for p in model.parameters())
    ckpt = tmp_path / "lvm" / "checkpoints" / "step_0000042"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 42, "tokens": 1000, "model": model.config.to_dict()}))
    untrained = ImageTokenizer("test", device="cpu").info
    title = sheet_title("analogy", "colorization", model, ckpt, untrained)
    assert "analogy prompt, task colorization" in title
    assert f"model {ckpt}: {params / 1e6:.2f}M parameters, 42 training steps" in title
    assert f"tokenizer {untrained['id']} (UNTRAINED" in title
    assert "(trained)" in sheet_title("analogy", "x", model, None, {**untrained, "trained": True})
    assert "(in memory)" in sheet_title("analogy", "x", model, None, untrained)


def test_sheet_has_a_title_band_above_the_rows(tmp_path):
    rows = [("prompt", [np.full((256, 256, 3), 200, np.uint8)] * 3), ("generated", [np.zeros((256, 256, 3), np.uint8)])]
    plain = np.asarray(Image.open(contact_sheet(rows, tmp_path / "plain.png")).convert("L"))
    titled = np.asarray(Image.open(contact_sheet(rows, tmp_path / "titled.png", title="T " * 200)).convert("L"))
    band = titled.shape[0] - plain.shape[0]
    assert titled.shape[1] == plain.shape[1] and band > 2 * 14  # a long title wraps onto several lines
    assert (titled[:band] < 128).any()  # text is drawn in the band
    assert (titled[band:] == plain).all()  # the rows, unchanged, below it
