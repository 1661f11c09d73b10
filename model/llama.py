"""The LLaMA decoder of the LVM: RMSNorm, SwiGLU, RoPE (θ 10000), no biases, untied embeddings.

Module names follow Hugging Face's `LlamaForCausalLM` (without its `model.` prefix) and RoPE
uses its rotate-half convention, so model/hf.py converts weights by renaming only.
Attention is PyTorch's scaled_dot_product_attention (flash kernels on GPU); `generate`-style
decoding uses a preallocated `KVCache`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from uvd.model.config import NUM_VISUAL_TOKENS, VOCAB_SIZE, ModelConfig
from uvd.model.moe import MoE, token_attributes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_len, head_dim) in HF's layout: the frequencies repeated over both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos, sin (T, hd)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for up to `max_len` positions: (B, kv_heads, max_len, hd)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.pos = 0  # positions filled
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
            if start > 0:  # new queries see the whole cache and, among themselves, the past
                causal = False
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        # Grouped-query attention inside SDPA: no repeated copies of k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy(h @ w.T, targets) over tokens, `chunk` tokens at a time, with the
    gradients computed in the same pass (as Liger's fused linear cross-entropy): no (N, V) logits
    tensor is kept, only one (chunk, V) block at a time. Targets equal to -100 are ignored.
    h (N, D) and w (V, D) are used in their own dtype; softmax and the loss are float32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        needs_h, needs_w = ctx.needs_input_grad[:2]  # False under no_grad (evaluation): loss only
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if needs_w else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            logits = (hc @ w.T).float()  # (chunk, V)
            valid = tc != -100
            safe = torch.where(valid, tc, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
            if grad_h is None and grad_w is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1)  # d(sum of losses) / d logits
            grad_logits[torch.arange(len(tc), device=tc.device), safe] -= 1.0
            grad_logits = (grad_logits * valid[:, None]).to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = grad_logits @ w
            if grad_w is not None:
                grad_w += (grad_logits.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ w.T (h (..., D), w (V, D)) over targets (...) != -100,
    without the full logits tensor. Under autocast h and w are cast to its dtype first, as nn.Linear would."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, w = h.to(dtype), w.to(dtype)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        total = LinearCrossEntropy.apply(h, w, targets, chunk)
    return total / (targets != -100).sum()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config.dim, config.moe_ffn_dim, config.moe_experts, config.moe_top_k,
                       config.moe_capacity_factor, config.moe_routing) if config.is_moe_layer(layer) else MLP(config)

    def forward(self, x, cos, sin, cache: KVCache | None = None, attributes: torch.Tensor | None = None):
        """-> (x, the MoE load-balancing loss, or None for a dense block)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.post_attention_layernorm(x), attributes)
            return x + y, aux
        return x + self.mlp(self.post_attention_layernorm(x)), None


class LLaMA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.loss_chunk = 4096  # tokens per block of the fused output layer + loss; 0: full logits
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: residual projections scaled by 1/sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters; `active`: those one token uses (top_k of each MoE layer's experts)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.layers:
                if isinstance(block.mlp, MoE):
                    per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                    n -= (block.mlp.num_experts - block.mlp.top_k) * per_expert
        return n if embeddings else n - self.embed_tokens.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N (active parameters) + attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params(embeddings=False, active=True) + 12 * c.num_layers * c.dim * seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) ids -> (logits (B, T, V), None); with targets (B, T) (-100 ignored): (None, mean loss),
        computed `loss_chunk` tokens at a time without the logits (or (logits, loss) when loss_chunk is 0)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len {self.config.max_seq_len}")
        x = self.embed_tokens(idx)
        cos = self.rope_cos[start : start + T].to(x.dtype)
        sin = self.rope_sin[start : start + T].to(x.dtype)
        attributes = token_attributes(idx, NUM_VISUAL_TOKENS, VOCAB_SIZE - NUM_VISUAL_TOKENS) \
            if self.config.moe_experts and self.config.moe_routing == "attribute" else None
        aux = []
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x, block_aux = checkpoint(block, x, cos, sin, None, attributes, use_reentrant=False)
            else:
                x, block_aux = block(x, cos, sin, cache, attributes)
            if block_aux is not None:
                aux.append(block_aux)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        logits = None
        if targets is not None and self.loss_chunk > 0:
            loss = chunked_cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk)
        else:
            logits = self.lm_head(x)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if loss is not None and aux and self.training:  # the training loss; eval reports cross-entropy alone
            loss = loss + self.config.moe_aux_weight * torch.stack(aux).mean()
        return logits, loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, num_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, allowed: int | None = None, generator: torch.Generator | None = None):
        """Sample `num_tokens` after `prompt` (B, T) with a KV cache; `allowed`: sample only ids < allowed."""
        B, T = prompt.shape
        cache = KVCache(self.config, B, T + max(0, num_tokens - 1), prompt.device, self.embed_tokens.weight.dtype)
        logits, _ = self(prompt, cache=cache)
        out = []
        for i in range(num_tokens):
            next_id = sample(logits[:, -1], temperature, top_k, top_p, allowed, generator)  # (B, 1)
            out.append(next_id)
            if i + 1 < num_tokens:
                logits, _ = self(next_id, cache=cache)
        return torch.cat(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           allowed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> ids (B, 1): temperature, then top-k, then nucleus (top-p) filtering."""
    logits = logits.float()
    if allowed is not None:
        logits = logits[:, :allowed]
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
