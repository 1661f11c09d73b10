"""Sparse mixture-of-experts feed-forward layers (GShard / Switch), an option of the LLaMA blocks.

`model.moe_experts: E` replaces the SwiGLU of every `moe_every`-th block by E SwiGLU experts of
`moe_ffn_dim` (default ffn_dim / top_k: the same active parameters as the dense block). Each
token goes to its top-k experts (k = 1 or 2, gates renormalized over the k), at most `capacity =
ceil(capacity_factor x tokens x k / E)` tokens per expert in training, first choices before second
ones (GShard); overflowing assignments are dropped (the residual carries the token). The auxiliary
load-balancing loss is Switch's E x sum_e f_e P_e (f_e: share of tokens whose first choice is e,
P_e: mean router probability of e), 1 at uniform routing, its minimum.

`moe_routing: attribute` routes by the token's attribute instead of its content (AG-MoE, Uni-Perceiver
v2): the router sees a learned embedding of the token's modality (visual id, special id, text id
above them), so all tokens of a modality share their experts. No expert parallelism: every rank
holds every expert, and every expert runs each step (on zero tokens if none), so DDP and FSDP see
the same parameters used on every rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_ATTRIBUTES = 3  # visual ids, special ids (PAD/BOS/EOS, reserved), text ids


def token_attributes(idx: torch.Tensor, num_visual: int, num_special: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) modality: 0 visual, 1 special, 2 text (ids above the visual and special ones)."""
    return (idx >= num_visual).long() + (idx >= num_visual + num_special).long()


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, capacity_factor: float, routing: str):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor, self.routing = num_experts, top_k, capacity_factor, routing
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.attribute_embed = nn.Embedding(NUM_ATTRIBUTES, dim) if routing == "attribute" else None
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def capacity(self, num_tokens: int) -> int:
        """Assignments an expert takes in training; in eval every assignment is kept."""
        if not self.training:
            return num_tokens * self.top_k
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def route(self, h: torch.Tensor, attributes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (N, D) -> router probabilities (N, E) float32, top-k experts (N, k), gates (N, k)."""
        if self.attribute_embed is not None:
            if attributes is None:
                raise ValueError("model.moe_routing: attribute routing needs the token attributes")
            router_in = self.attribute_embed(attributes.reshape(-1)).to(h.dtype)
        else:
            router_in = h
        probs = self.router(router_in).float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True) if self.top_k > 1 else top_p
        return probs, top_i, gates

    def forward(self, x: torch.Tensor, attributes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (y (B, T, D), auxiliary load-balancing loss ())."""
        B, T, D = x.shape
        h = x.reshape(-1, D)
        N, E = h.shape[0], self.num_experts
        probs, top_i, gates = self.route(h, attributes)
        # Assignment order: every token's first choice, then every token's second (GShard's priority).
        expert = top_i.T.reshape(-1)  # (k N,)
        token = torch.arange(N, device=x.device).repeat(self.top_k)
        gate = gates.T.reshape(-1)
        one_hot = F.one_hot(expert, E)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each assignment in its expert
        keep = position < self.capacity(N)
        out = torch.zeros_like(h)
        for e, ffn in enumerate(self.experts):  # every expert runs, on zero tokens if none reach it
            sel = keep & (expert == e)
            tokens = token[sel]
            out.index_add_(0, tokens, ffn(h[tokens]) * gate[sel, None].to(h.dtype))
        first = F.one_hot(top_i[:, 0], E).float().mean(0)  # f_e
        aux = E * (first * probs.mean(0)).sum()
        return out.view(B, T, D), aux
