"""The LLaMA model: shapes, forward/backward, KV-cache decoding, sampling, configs, HF round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import (BOS_ID, EOS_ID, MODEL_SIZES, PAD_ID, VOCAB_SIZE, ModelConfig, load_train_config,
                          model_config, train_config_from_dict)
from model.hf import export_hf, import_hf
from model.llama import LLaMA, sample

TRAIN_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "train").glob("*.yaml"))


def tiny(**overrides) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(model_config("tiny", max_seq_len=512, **overrides))


def test_special_ids_are_reserved():
    assert VOCAB_SIZE == 8292 and PAD_ID == 8192 and BOS_ID == 8193 and EOS_ID == 8194


def test_lvm_sizes_have_the_published_parameter_counts():
    expected = {"lvm_300m": 300e6, "lvm_600m": 600e6, "lvm_1b": 1.1e9, "lvm_3b": 3.4e9, "lvm_7b": 6.7e9}
    for name, params in expected.items():
        c = model_config(name)
        per_layer = 4 * c.dim * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.dim
        total = 2 * c.vocab_size * c.dim + c.num_layers * per_layer + c.dim
        assert abs(total - params) / params < 0.15, (name, total)
    assert set(MODEL_SIZES) >= {"tiny", "lvm_300m", "lvm_600m", "lvm_1b", "lvm_3b", "lvm_7b"}


def test_forward_backward_shapes_and_grads():
    model = tiny()
    idx = torch.randint(0, VOCAB_SIZE, (2, 64))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 64, VOCAB_SIZE)
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB_SIZE))).item()) < 0.5  # ~uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 8192, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = tiny()
        model.activation_checkpointing = ckpt
        model(idx, idx)[1].backward()
        grads.append(model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_kv_cache_matches_the_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 8192, (2, 40))
    full, _ = model(idx)
    from model.llama import KVCache

    cache = KVCache(model.config, 2, 40, "cpu", torch.float32)
    parts = [model(idx[:, :25], cache=cache)[0], model(idx[:, 25:30], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_is_greedy_consistent_and_stays_visual():
    model = tiny().eval()
    prompt = torch.randint(0, 8192, (1, 20))
    out = model.generate(prompt, 12, temperature=0.0, allowed=8192)
    seq = prompt
    for _ in range(12):  # greedy without the cache
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1, :8192].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 20:])
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 30, temperature=1.0, top_k=50, top_p=0.9, allowed=8192, generator=g)
    assert sampled.shape == (1, 30) and int(sampled.max()) < 8192


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    assert sample(logits, temperature=0).item() == 4
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws <= {3, 4}
    draws = {sample(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {4}  # the top id alone holds more than half the mass
    assert {sample(logits, 1.0, allowed=3, generator=g).item() for _ in range(200)} <= {0, 1, 2}


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.size"):
        train_config_from_dict({"model": {"size": "huge"}})
    with pytest.raises(ValueError, match="train.batch_size"):
        train_config_from_dict({"model": "tiny", "train": {"batch_size": 0}})
    with pytest.raises(ValueError, match="data.mixture.laion"):
        train_config_from_dict({"model": "tiny", "data": {"mixture": {"laion": -1}}})
    with pytest.raises(ValueError, match="model.dim"):
        train_config_from_dict({"model": {"size": "tiny", "dim": 66}})
    with pytest.raises(ValueError, match="data.seq_len"):
        train_config_from_dict({"model": {"size": "tiny", "max_seq_len": 128}, "data": {"seq_len": 256}})


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_training_recipes_load(path):
    config = load_train_config(path)
    assert config.model.dim > 0 and config.data.seq_len <= config.model.max_seq_len
    assert ModelConfig(**config.model.to_dict()) == config.model


def test_hf_round_trip_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny(num_kv_heads=2).eval()
    with torch.no_grad():  # non-trivial norm gains, so a wrong name would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == VOCAB_SIZE
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB_SIZE, (2, 48))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    back = import_hf(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours)
