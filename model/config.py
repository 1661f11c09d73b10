"""Model sizes and the training config.

The LVM sizes (SPEC.md) are named configs; `tiny` and `small` are for tests and the demo.
A training config is a YAML file (recipes/train/*.yaml) with the sections `model`, `data`,
`optim`, `train` and `eval`; a bad field raises ValueError naming it.

    uvd train recipes/train/tiny.yaml --set train.max_steps=50 --set data.runs=[out/laion]
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uvd.recipe import from_mapping, load_yaml_config

# Vocabulary: visual ids 0..8191, then LVM's 100 reserved ids. LVM pads with 8192 at
# inference; we keep that and put BOS and EOS right after it.
NUM_VISUAL_TOKENS = 8192
VOCAB_SIZE = 8292
PAD_ID = 8192
BOS_ID = 8193
EOS_ID = 8194
TOKENS_PER_IMAGE = 256


@dataclass
class ModelConfig:
    dim: int = 1024
    num_layers: int = 22
    num_heads: int = 8
    num_kv_heads: int | None = None  # grouped-query attention; None: = num_heads
    ffn_dim: int | None = None  # SwiGLU hidden size; None: LLaMA's rule (8/3 dim, rounded up to 256)
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Sparse mixture-of-experts FFN (model/moe.py); 0 experts: every block dense, as the LVM.
    moe_experts: int = 0
    moe_top_k: int = 2  # experts per token: 1 (Switch) or 2 (GShard)
    moe_every: int = 2  # every n-th block (blocks n-1, 2n-1, ...) is sparse
    moe_ffn_dim: int | None = None  # per expert; None: ffn_dim / top_k, the dense block's active parameters
    moe_capacity_factor: float = 1.25
    moe_routing: str = "token"  # token (by content) or attribute (by the token's modality, AG-MoE)
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss in the training loss

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.ffn_dim is None:
            self.ffn_dim = 256 * ((int(8 * self.dim / 3) + 255) // 256)
        if self.moe_ffn_dim is None and self.moe_experts:
            self.moe_ffn_dim = max(1, self.ffn_dim // max(1, self.moe_top_k))

    def validate(self, path: str) -> None:
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"{path}.dim: {self.dim} must split into {self.num_heads} heads of even size")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{path}.num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.vocab_size <= EOS_ID:
            raise ValueError(f"{path}.vocab_size: must be > {EOS_ID} (visual ids + PAD, BOS, EOS)")
        if self.moe_experts:
            if self.moe_experts < 2:
                raise ValueError(f"{path}.moe_experts: 0 (dense) or >= 2, got {self.moe_experts}")
            if self.moe_top_k not in (1, 2) or self.moe_top_k > self.moe_experts:
                raise ValueError(f"{path}.moe_top_k: 1 or 2 (and <= moe_experts), got {self.moe_top_k}")
            if self.moe_every < 1 or self.moe_every > self.num_layers:
                raise ValueError(f"{path}.moe_every: between 1 and num_layers {self.num_layers}, got {self.moe_every}")
            if self.moe_capacity_factor <= 0 or self.moe_ffn_dim <= 0 or self.moe_aux_weight < 0:
                raise ValueError(f"{path}.moe_capacity_factor/moe_ffn_dim/moe_aux_weight: need > 0, > 0, >= 0")
            if self.moe_routing not in ("token", "attribute"):
                raise ValueError(f"{path}.moe_routing: {self.moe_routing!r} is not one of token, attribute")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# SPEC.md's LVM sizes; 3B and 7B follow OpenLLaMA's FFN sizes (the LVM was trained with EasyLM).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_layers=2, num_heads=4),
    "small": dict(dim=192, num_layers=4, num_heads=6, max_seq_len=4096),
    "lvm_300m": dict(dim=1024, num_layers=22, num_heads=8),
    "lvm_600m": dict(dim=1536, num_layers=22, num_heads=16),
    "lvm_1b": dict(dim=2048, num_layers=22, num_heads=16),
    "lvm_3b": dict(dim=3200, num_layers=26, num_heads=32, ffn_dim=8640),
    "lvm_7b": dict(dim=4096, num_layers=32, num_heads=32, ffn_dim=11008),
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_SIZES:
        raise ValueError(f"model.size: unknown size {name!r}; choose one of {', '.join(MODEL_SIZES)}")
    return ModelConfig(**{**MODEL_SIZES[name], **overrides})


@dataclass
class DataOptions:
    runs: list[str] = field(default_factory=list)  # run folders (or parents of run folders) holding shards
    seq_len: int = 4096  # tokens per training window (16 images x 256)
    mixture: dict[str, float] = field(default_factory=dict)  # SOURCE or SOURCE/TASK -> weight; 0 leaves it out
    shuffle_buffer: int = 1024  # sentences
    seed: int = 0
    include_incomplete: bool = False  # also read runs whose manifest status is not `complete` (failed, running)
    prefetch: int = 4  # batches built ahead by a background thread (0: build on the training thread)
    batching: str = "mixed"  # mixed (every window mixes by weight) or task (each step one SOURCE/TASK)
    task_alpha: float = 0.5  # task batching: P(task) proportional to its tokens ^ task_alpha

    def validate(self, path: str) -> None:
        if self.seq_len < 2:
            raise ValueError(f"{path}.seq_len: must be >= 2, got {self.seq_len}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"{path}.shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        if self.prefetch < 0:
            raise ValueError(f"{path}.prefetch: must be >= 0, got {self.prefetch}")
        if self.batching not in ("mixed", "task"):
            raise ValueError(f"{path}.batching: {self.batching!r} is not one of mixed, task")
        if self.task_alpha < 0:
            raise ValueError(f"{path}.task_alpha: must be >= 0, got {self.task_alpha}")
        for key, weight in self.mixture.items():
            if weight < 0:
                raise ValueError(f"{path}.mixture.{key}: weights must be >= 0, got {weight}")


@dataclass
class OptimOptions:
    lr: float = 1.5e-4
    end_lr: float = 3e-5  # cosine decay reaches this at train.max_steps
    warmup_steps: int = 8000
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: off

    def validate(self, path: str) -> None:
        if self.lr <= 0 or self.end_lr < 0 or self.end_lr > self.lr:
            raise ValueError(f"{path}.lr/end_lr: need lr > 0 and 0 <= end_lr <= lr, got {self.lr}, {self.end_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"{path}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{path}.betas: expected two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainOptions:
    out: str = "out/train/lvm"  # checkpoints and logs
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "bfloat16"  # autocast dtype on GPU: bfloat16 or float32 (CPU always runs float32)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # under torchrun: ddp or fsdp
    log_every: int = 10
    ckpt_every: int = 500  # steps; a checkpoint is also written at the end
    eval_every: int = 0  # steps between validation losses on eval.runs (0: off)
    eval_batches: int = 4  # micro-batches of eval.runs per validation
    loss_chunk: int = 4096  # tokens per chunk of the fused output layer + cross-entropy (0: full logits)
    keep_checkpoints: int = 2
    tensorboard: bool = False
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs only
    task_grad_balance: bool = False  # with data.batching: task, rescale each task's gradient (see README)

    def validate(self, path: str) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("eval_every", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"{path}.peak_tflops: must be > 0 (or null), got {self.peak_tflops}")
        for name, choices in (("device", ("auto", "cpu", "cuda")), ("dtype", ("bfloat16", "float32")),
                              ("parallel", ("ddp", "fsdp"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{path}.{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")


@dataclass
class EvalOptions:
    runs: list[str] = field(default_factory=list)  # held-out run folders; empty: no eval after training
    max_prompts_per_task: int = 20
    num_windows: int = 8  # packed windows for the overall held-out perplexity
    batch_size: int = 4
    # `uvd ablate`: more variants beside the left-out ones, NAME -> {dotted.key: value} on top of the
    # config, e.g. {moe: {model.moe_experts: 8}, task_batches: {data.batching: task}}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name, changes in self.variants.items():
            if not isinstance(changes, dict) or not all(isinstance(k, str) and "." in k for k in changes):
                raise ValueError(f"{path}.variants.{name}: expected a mapping of dotted keys to values, got {changes!r}")
        for name in ("max_prompts_per_task", "num_windows", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    model: ModelConfig
    size: str = "lvm_300m"
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = {"size": self.size, **data["model"]}
        del data["size"]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = {"data": DataOptions, "optim": OptimOptions, "train": TrainOptions, "eval": EvalOptions}


def _float_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {name for name, hint in hints.items()
            if hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint))
            or (typing.get_origin(hint) is list and typing.get_args(hint) == (float,))}


def _parse_number(value: Any) -> Any:
    """'3e-4', '1_000.5', ' 2E3 ' -> float; anything else unchanged (the type check then names the field).
    YAML 1.1 reads exponents without a dot (3e-4) as strings, and --set values go through YAML."""
    if isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _numbers_from_strings(cls: type, data: Any) -> Any:
    """A copy of a section's mapping with the numeric strings of its float fields made floats."""
    if not isinstance(data, dict):
        return data
    fields = _float_fields(cls)
    out = dict(data)
    for key in fields & set(out):
        value = out[key]
        out[key] = [_parse_number(v) for v in value] if isinstance(value, list) else _parse_number(value)
    if cls is DataOptions and isinstance(out.get("mixture"), dict):  # weights are floats too
        out["mixture"] = {k: _parse_number(v) for k, v in out["mixture"].items()}
    return out


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """`model: {size: NAME, ...overrides}` plus the sections; ValueError names the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"training config: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in ("model", *_SECTIONS):
            raise ValueError(f"{key}: unknown key; expected one of model, {', '.join(_SECTIONS)}")
    model_data = data.get("model") or {}
    model_data = {"size": model_data} if isinstance(model_data, str) else model_data
    if not isinstance(model_data, dict):
        raise ValueError(f"model: expected a size name or a mapping with size and overrides, got {model_data!r}")
    model_data = dict(model_data)
    size = model_data.pop("size", "lvm_300m")
    if size not in MODEL_SIZES:
        raise ValueError(f"model.size: unknown size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    model_data = _numbers_from_strings(ModelConfig, model_data)
    overrides = from_mapping(ModelConfig, model_data, "model")  # checks keys and types
    model = model_config(size, **{k: getattr(overrides, k) for k in model_data})
    model.validate("model")
    sections = {name: from_mapping(cls, _numbers_from_strings(cls, data.get(name) or {}), name)
                for name, cls in _SECTIONS.items()}
    for name, section in sections.items():
        section.validate(name)
    config = TrainConfig(model=model, size=size, **sections)
    if config.train.task_grad_balance and config.data.batching != "task":
        raise ValueError("train.task_grad_balance: needs data.batching: task (one task per step)")
    if config.data.seq_len > model.max_seq_len:
        raise ValueError(f"data.seq_len: {config.data.seq_len} is longer than model.max_seq_len {model.max_seq_len}")
    return config


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return load_yaml_config(path, overrides, train_config_from_dict, what="training config")
