"""Export and import the weights in Hugging Face's `LlamaForCausalLM` layout.

    uvd train ... ; python -c "from uvd.model.hf import export_hf; export_hf('out/train/tiny', 'out/hf/tiny')"

Our modules carry HF's names (less the `model.` prefix of the decoder) and our RoPE is HF's
rotate-half form, so the conversion renames keys and writes `config.json`; no permutation of
q/k weights is needed. Loading the folder with `transformers.LlamaForCausalLM.from_pretrained`
gives the same logits (tests/test_model.py checks it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uvd.model.config import BOS_ID, EOS_ID, PAD_ID, ModelConfig
from uvd.model.llama import LLaMA


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_config(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def export_hf(model: LLaMA | str | Path, out_dir: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (HF names) for a model or a checkpoint/training folder."""
    if not isinstance(model, LLaMA):
        from uvd.model.checkpoint import load_model

        model = load_model(model)
    if model.config.moe_experts:
        raise ValueError("model.moe_experts: LlamaForCausalLM has no mixture-of-experts layers (and Mixtral's layout "
                         "has no dense blocks between sparse ones, nor attribute routing); keep the checkpoint's "
                         "model.safetensors and load it with model.checkpoint.load_model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(k): v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.config), indent=1))
    return out_dir


def import_hf(hf_dir: str | Path) -> LLaMA:
    """Our model from a `LlamaForCausalLM` folder (config.json + model.safetensors, one file)."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{hf_dir}/config.json: model_type {cfg.get('model_type')!r}, expected 'llama'")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{hf_dir}/config.json: tied embeddings are not supported (the LVM unties them)")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"{hf_dir}/config.json: only plain RoPE is supported, got {rope or cfg.get('rope_scaling')}")
    config = ModelConfig(
        dim=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads"), ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_seq_len=cfg.get("max_position_embeddings", 4096), rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
    )
    model = LLaMA(config)
    state = {from_hf_name(k): v for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.eval()
