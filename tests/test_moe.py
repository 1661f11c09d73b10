"""Multi-task training options: sparse MoE layers, task-homogeneous batches (P ∝ size^alpha) and
per-task gradient balancing, each against a reference computed another way."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from uvd.model.checkpoint import latest_checkpoint, load_model
from uvd.model.config import model_config, train_config_from_dict
from uvd.model.data import PackedLoader, Prefetcher, find_components
from uvd.model.hf import export_hf
from uvd.model.llama import LLaMA
from uvd.model.moe import MoE
from uvd.model.train import TaskGradBalance, train
from test_train import config, eval_runs, runs  # noqa: F401  (module fixtures of synthetic runs)


def moe(num_experts=4, top_k=2, capacity_factor=1.25, routing="token") -> MoE:
    torch.manual_seed(0)
    return MoE(16, 32, num_experts, top_k, capacity_factor, routing)


def test_moe_equals_a_per_token_reference():
    layer = moe().eval()  # eval: no capacity limit
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        y, _ = layer(x)
        probs = layer.router(x.reshape(-1, 16)).softmax(-1)
        for n, h in enumerate(x.reshape(-1, 16)):
            top = probs[n].topk(2)
            gates = top.values / top.values.sum()
            want = sum(g * layer.experts[int(e)](h) for g, e in zip(gates, top.indices))
            torch.testing.assert_close(y.reshape(-1, 16)[n], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_capacity_keeps_first_choices_first(top_k):
    layer = moe(top_k=top_k, capacity_factor=1.0).train()
    with torch.no_grad():  # every token's first choice is expert 0, its second expert 1
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 4.0, 2.0
    x = torch.randn(1, 16, 16)
    x[..., 0] = 1.0
    capacity = math.ceil(1.0 * 16 * top_k / 4)  # 4 (top-1) or 8 (top-2) assignments per expert
    assert layer.capacity(16) == capacity
    y, _ = layer(x)
    with torch.no_grad():
        probs = layer.router(x[0]).softmax(-1)
        top = probs.topk(top_k)
        gates = top.values / top.values.sum(-1, keepdim=True) if top_k == 2 else top.values
        for n in range(16):  # tokens in order fill expert 0, then (top-2) expert 1, up to capacity
            want = torch.zeros(16)
            for slot, expert in enumerate(range(top_k)):
                if n < capacity:
                    want = want + gates[n, slot] * layer.experts[expert](x[0, n])
            torch.testing.assert_close(y[0, n], want, atol=1e-6, rtol=1e-5)
    assert (y[0, capacity:].abs().sum(-1) == 0).all()  # dropped: the residual carries them


def test_aux_loss_is_minimal_at_uniform_routing():
    layer = moe(num_experts=4, top_k=1).train()
    x = torch.randn(4, 32, 16)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
        assert layer(x)[1].item() == pytest.approx(1.0)
        layer.router.weight[0] = 50.0  # every token to expert 0 with probability ~1
        collapsed = layer(x.abs())[1].item()
    assert collapsed == pytest.approx(4.0, rel=1e-3)
    with torch.no_grad():
        layer.router.weight.normal_(0, 2.0)
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    start = layer(x)[1].item()
    for _ in range(60):  # minimizing the aux loss alone balances the routing towards its minimum, 1
        optimizer.zero_grad()
        layer(x)[1].backward()
        optimizer.step()
    end = layer(x)[1].item()
    assert start > 1.05 and 1.0 - 1e-3 < end < start and end < 1.1, (start, end)


def test_attribute_routing_sends_each_modality_to_its_experts():
    torch.manual_seed(0)
    model = LLaMA(model_config("tiny", max_seq_len=64, moe_experts=4, moe_every=1, moe_routing="attribute"))
    layer = model.layers[0].mlp
    idx = torch.tensor([[8193, 5, 900, 8000, 8194, 8192, 42]])  # BOS, visual..., EOS, PAD, visual
    from uvd.model.moe import token_attributes

    attributes = token_attributes(idx, 8192, 100)
    assert attributes.tolist() == [[1, 0, 0, 0, 1, 1, 0]]
    assert token_attributes(torch.tensor([8292, 9000]), 8192, 100).tolist() == [2, 2]  # text ids above
    _, top, _ = layer.route(torch.randn(7, 64), attributes)
    assert len({tuple(top[i].tolist()) for i in (1, 2, 3, 6)}) == 1 and len({tuple(top[i].tolist()) for i in (0, 4, 5)}) == 1
    logits, loss = model(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.layers[0].mlp.attribute_embed.weight.grad is not None


def test_moe_model_trains_resumes_exactly_with_task_batches_and_balancing(runs, tmp_path):  # noqa: F811
    sections = dict(model={"size": "tiny", "max_seq_len": 4096, "moe_experts": 4, "moe_every": 2, "moe_top_k": 2},
                    data={"batching": "task", "task_alpha": 0.5, "prefetch": 2},
                    train={"grad_accum": 2, "batch_size": 2, "task_grad_balance": True, "max_steps": 4,
                           "ckpt_every": 2})

    def cfg(out):
        c = config(runs, out, data=sections["data"], train=sections["train"])
        data = c.to_dict()
        data["model"] = sections["model"]
        return train_config_from_dict(data)

    straight = train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"), stop_after=2)
    info = json.loads((latest_checkpoint(tmp_path / "b") / "trainer.json").read_text())
    assert info["step"] == 2 and sum(info["task_grad_balance"]["count"]) == 2
    rest = train(cfg(tmp_path / "b"))
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in straight["history"][2:]]
    assert [h["task"] for h in rest["history"]] == [h["task"] for h in straight["history"][2:]]
    assert all("/" in h["task"] for h in straight["history"])  # one SOURCE/TASK per step
    model = load_model(tmp_path / "a")
    assert model.config.moe_experts == 4 and isinstance(model.layers[1].mlp, MoE)
    assert model.num_params(active=True) < model.num_params()
    with pytest.raises(ValueError, match="moe_experts"):
        export_hf(model, tmp_path / "hf")


def test_task_batches_draw_one_task_with_probability_size_to_the_alpha(runs):  # noqa: F811
    loader = PackedLoader([runs], 64, 1, shuffle_buffer=8, batching="task", task_alpha=0.5, batches_per_task=2)
    tokens = {c.key: c.tokens for c in loader.components}
    assert set(tokens) == {"laion/single", "imagenet_groups/category_k2", "video/video_s10", "video/video_s20"}
    want = {k: v ** 0.5 / sum(t ** 0.5 for t in tokens.values()) for k, v in tokens.items()}
    assert {c.key: c.weight for c in loader.components} == pytest.approx(want)
    counts = dict.fromkeys(tokens, 0)
    previous = None
    for i in range(3000):
        before = loader.drawn.copy()
        loader.next_batch()
        task = loader.batch_task
        changed = {loader.components[j].key for j in np.flatnonzero(loader.drawn != before)}
        assert changed <= {task}  # the batch's windows hold that task alone
        if i % 2 == 1:
            assert task == previous  # one task per optimizer step (2 micro-batches)
        else:
            counts[task] += 1
        previous = task
    for key, p in want.items():
        assert abs(counts[key] / 1500 - p) < 0.045, (key, counts[key] / 1500, p)  # ~3.5 sigma
    shares = loader.token_shares()
    for key, p in want.items():
        assert abs(shares[key] - p) < 0.045, (key, shares[key], p)


def test_task_batches_resume_exactly_through_the_prefetcher(runs):  # noqa: F811
    def make():
        return PackedLoader([runs], 128, 2, shuffle_buffer=8, batching="task", task_alpha=0.3, batches_per_task=3)

    plain = make()
    fetch = Prefetcher(make(), depth=3, pin=False)
    try:
        for _ in range(7):
            assert torch.equal(fetch.next_batch()[0], plain.next_batch()[0])
            assert fetch.batch_task == plain.batch_task
        state = json.loads(json.dumps(fetch.state_dict()))
    finally:
        fetch.close()
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(resumed.next_batch()[0], plain.next_batch()[0])
        assert resumed.batch_task == plain.batch_task
    mixed = PackedLoader([runs], 128, 2, shuffle_buffer=8)
    with pytest.raises(ValueError, match="does not fit this data"):
        mixed.load_state_dict(state)


def test_task_batching_config_errors(runs):  # noqa: F811
    with pytest.raises(ValueError, match="data.mixture.laion"):
        find_components([runs], {"laion": 2.0}, task_alpha=0.5)
    keys = {c.key for c in find_components([runs], {"laion": 0, "video/video_s20": 0}, task_alpha=0.5)}
    assert keys == {"imagenet_groups/category_k2", "video/video_s10"}
    with pytest.raises(ValueError, match="data.batching"):
        train_config_from_dict({"model": "tiny", "data": {"batching": "random"}})
    with pytest.raises(ValueError, match="train.task_grad_balance"):
        train_config_from_dict({"model": "tiny", "train": {"task_grad_balance": True}})
    with pytest.raises(ValueError, match="model.moe_top_k"):
        train_config_from_dict({"model": {"size": "tiny", "moe_experts": 4, "moe_top_k": 3}})


def test_task_gradient_balancing_equalizes_the_tasks_gradient_norms():
    balance = TaskGradBalance(2, beta=0.9)
    p = torch.nn.Parameter(torch.zeros(4))
    norms = []
    for step, (task, scale) in enumerate([(0, 10.0), (1, 1.0), (0, 10.0), (1, 1.0), (0, 10.0)]):
        p.grad = torch.full((4,), scale / 2)  # L2 norm = scale
        balance.apply([p], task)
        norms.append(float(p.grad.norm()))
    # step 1: only task 0 seen, left as is; then every step is scaled to the mean of the tasks' EMAs (5.5)
    assert norms == pytest.approx([10.0, 5.5, 5.5, 5.5, 5.5])
    saved = json.loads(json.dumps(balance.state_dict()))
    again = TaskGradBalance(2)
    again.load_state_dict(saved)
    p.grad = torch.full((4,), 0.5)
    again.apply([p], 1)
    assert float(p.grad.norm()) == pytest.approx(5.5)


def test_ablate_compares_dense_with_moe_and_mixed_with_task_batches(runs, eval_runs, tmp_path):  # noqa: F811
    from uvd.model.evaluate import ablate, ablation_variants, format_results

    cfg = config(runs, tmp_path / "abl", train={"max_steps": 2, "ckpt_every": 2, "batch_size": 2},
                 eval={"variants": {"moe": {"model.moe_experts": 4, "model.moe_top_k": 2},
                                    "task_batches": {"data.batching": "task"}},
                       "max_prompts_per_task": 1, "num_windows": 2, "batch_size": 2})
    variants = ablation_variants(cfg, ["video"])
    assert list(variants) == ["all", "no_video", "moe", "task_batches"]
    assert variants["moe"].model.moe_experts == 4 and variants["all"].model.moe_experts == 0
    assert variants["moe"].model.moe_ffn_dim == cfg.model.ffn_dim // 2  # equal active parameters
    assert variants["task_batches"].data.batching == "task" and variants["moe"].data.batching == "mixed"
    assert variants["moe"].train.out == str(tmp_path / "abl" / "moe") and not variants["moe"].eval.variants
    bad = config(runs, tmp_path / "bad", eval={"variants": {"x": {"model.moe_top_k": 5, "model.moe_experts": 4}}})
    with pytest.raises(ValueError, match="eval.variants.x: model.moe_top_k"):
        ablation_variants(bad, [])
    results = ablate(cfg, [], [str(eval_runs)])
    assert list(results) == ["all", "moe", "task_batches"]
    for r in results.values():
        assert set(r["tasks"]) == {"colorization", "video_s10"} and r["heldout"]["seq_len"] == 256
    assert set(results["task_batches"]["token_shares"]) == {"laion/single", "imagenet_groups/category_k2",
                                                            "video/video_s10", "video/video_s20"}
    assert "moe" in format_results(results)
