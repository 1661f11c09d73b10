"""The LLaMA model: shapes, forward/backward, KV-cache decoding, sampling, configs, HF round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uvd.model.config import (BOS_ID, EOS_ID, MODEL_SIZES, PAD_ID, VOCAB_SIZE, ModelConfig, load_train_config,
                          model_config, train_config_from_dict)
from uvd.model.hf import export_hf, import_hf
from uvd.model.llama import LLaMA, sample

TRAIN_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "train").glob("*.yaml"))


def tiny(**overrides) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(model_config("tiny", max_seq_len=512, **overrides))


def test_special_ids_are_reserved():
    assert VOCAB_SIZE == 8292 and PAD_ID == 8192 and BOS_ID == 8193 and EOS_ID == 8194


def config_param_count(c: ModelConfig) -> int:
    """LLaMA's parameter count from the config alone: attention (q, o: dim x heads*hd; k, v: dim x
    kv_heads*hd), SwiGLU (3 x dim x ffn), two RMSNorms per block, untied embedding and head, final norm."""
    hd = c.dim // c.num_heads
    per_layer = 2 * c.dim * c.num_heads * hd + 2 * c.dim * c.num_kv_heads * hd + 3 * c.dim * c.ffn_dim + 2 * c.dim
    return 2 * c.vocab_size * c.dim + c.num_layers * per_layer + c.dim


def test_lvm_sizes_have_the_published_parameter_counts():
    expected = {"lvm_300m": 300e6, "lvm_600m": 600e6, "lvm_1b": 1.1e9, "lvm_3b": 3.4e9, "lvm_7b": 6.7e9}
    for name in MODEL_SIZES:
        c = model_config(name)
        with torch.device("meta"):  # the real modules, no memory for the weights
            model = LLaMA(c)
        counted = sum(p.numel() for p in model.parameters())
        assert counted == config_param_count(c) == model.num_params(), name  # exact: 0 tolerance
        if name in expected:  # and close to what the LVM paper calls each size
            assert abs(counted - expected[name]) / expected[name] < 0.15, (name, counted)
    assert set(MODEL_SIZES) >= {"tiny", *expected}
    gqa = model_config("tiny", num_kv_heads=2)
    with torch.device("meta"):
        assert sum(p.numel() for p in LLaMA(gqa).parameters()) == config_param_count(gqa) < config_param_count(model_config("tiny"))


def test_forward_backward_shapes_and_grads():
    model = tiny()
    idx = torch.randint(0, VOCAB_SIZE, (2, 64))
    logits, _ = model(idx)
    assert logits.shape == (2, 64, VOCAB_SIZE)
    no_logits, loss = model(idx, idx)
    assert no_logits is None  # training never builds the (B, T, V) logits
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


@pytest.mark.parametrize("chunk", [3, 64, 10_000])
def test_chunked_cross_entropy_equals_the_full_one(chunk):
    """Loss and gradients (of every parameter) of the fused, chunked output layer + loss equal
    those of full float32 logits and F.cross_entropy, with ignored targets."""
    idx = torch.randint(0, VOCAB_SIZE, (2, 40))
    targets = torch.randint(0, VOCAB_SIZE, (2, 40))
    targets[0, :9] = -100
    results = []
    for loss_chunk in (0, chunk):
        model = tiny()
        model.loss_chunk = loss_chunk
        logits, loss = model(idx, targets)
        assert (logits is None) == (loss_chunk > 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-7, rtol=1e-5, msg=name)


def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_the_full_one():
    from uvd.model.llama import chunked_cross_entropy

    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, 16)
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    (gh, gw) = torch.autograd.grad(loss, (h, w))
    (rh, rw) = torch.autograd.grad(ref, (h, w))
    assert gw.dtype == w.dtype  # the float32 master weight gets a float32 gradient
    torch.testing.assert_close(gh, rh, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-3, rtol=2e-2)


def test_grouped_query_attention_equals_the_repeated_heads_reference():
    """SDPA's own GQA (enable_gqa) against k, v repeated per query head, with and without a cache."""
    from uvd.model.llama import apply_rope

    model = tiny(num_kv_heads=2).eval()
    attn = model.layers[0].self_attn
    assert attn.num_heads == 4 and attn.num_kv_heads == 2
    x = torch.randn(2, 24, 64)
    cos, sin = model.rope_cos[:24], model.rope_sin[:24]
    B, T = 2, 24
    q = apply_rope(attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, 2, 16).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, 2, 16).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query heads 0,1 share kv head 0
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), ref, atol=1e-5, rtol=1e-5)
        from uvd.model.llama import KVCache

        cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
        parts = [attn(x[:, :20], cos[:20], sin[:20], cache)]
        cache.pos = 20
        parts.append(attn(x[:, 20:], cos[20:], sin[20:], cache))
        torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_prompt_length_guard_counts_the_positions_the_model_sees():
    from uvd.model.prompt import prompt, prompt_positions

    assert prompt_positions(15, 1) == 4096  # the default sequential prompt fits the LVM's 4096
    assert prompt_positions(2 * 7 + 1, 1) == 4096  # analogy --context 7
    model = LLaMA(model_config("tiny", max_seq_len=4096))
    with pytest.raises(ValueError, match="max_seq_len 4096"):  # refused before any data is read
        prompt(model, [], "unused.png", mode="sequential", num_context=16)
    with pytest.raises(ValueError, match="max_seq_len 4096"):
        prompt(model, [], "unused.png", mode="analogy", num_context=8)
    # That what it admits really runs (15 frames + 1 at 4096) is tests/test_train.py's CLI test.


def test_kv_cache_matches_the_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 8192, (2, 40))
    full, _ = model(idx)
    from uvd.model.llama import KVCache

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


def test_train_config_accepts_numbers_as_users_type_them(tmp_path):
    """YAML 1.1 reads 3e-4 (no dot) as a string; float fields take numeric strings."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train" / "tiny.yaml"
    config = load_train_config(recipe, ["optim.lr=3e-4", "optim.end_lr=1E-5", "optim.betas=[0.9, 95e-2]",
                                        "model.rope_theta=1e4", "data.mixture={laion: 5e-1}", "optim.grad_clip=1"])
    assert config.optim.lr == 3e-4 and config.optim.end_lr == 1e-5 and config.optim.betas == [0.9, 0.95]
    assert config.model.rope_theta == 1e4 and config.data.mixture == {"laion": 0.5} and config.optim.grad_clip == 1.0
    path = tmp_path / "t.yaml"
    path.write_text(recipe.read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert load_train_config(path).optim.lr == 3e-3
    with pytest.raises(ValueError, match="optim.lr: expected a number"):
        load_train_config(recipe, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="train.batch_size: expected an integer"):
        load_train_config(recipe, ["train.batch_size=8e0"])  # integer fields stay integers


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
