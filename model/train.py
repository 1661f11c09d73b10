"""The LVM trainer: AdamW with warmup + cosine decay, grad clipping and accumulation, bf16 autocast,
checkpoints with exact resume, and DDP or FSDP when run under torchrun.

    uvd train recipes/train/tiny.yaml --set data.runs=[out/laion] --set train.max_steps=200
    torchrun --nproc_per_node 8 -m uvd.cli train recipes/train/lvm_300m.yaml --set train.parallel=fsdp

A checkpoint is a folder `OUT/checkpoints/step_NNNNNNN/` with `model.safetensors` (HF-style
names, full weights), `optimizer.pt` (loaded with weights_only=True), `data_rankR.json` (each
rank's exact loader position) and `trainer.json` (step, tokens, model config). Running the same
command again resumes from `OUT/checkpoints/latest`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, OptimOptions, TrainConfig
from model.data import PackedLoader
from model.llama import LLaMA

logger = logging.getLogger(__name__)

# Dense bf16 peak per device, for MFU (no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def lr_at(step: int, optim: OptimOptions, max_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine to end_lr at max_steps (step counts from 0)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.end_lr + 0.5 * (optim.lr - optim.end_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, optim: OptimOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights), not on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=device.type == "cuda")


def setup_distributed(device_option: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); a process group is started when torchrun set WORLD_SIZE > 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_option == "cuda" or (device_option == "auto" and torch.cuda.is_available())
    if device_option == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda asked for, but CUDA is not available")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def peak_flops(options_tflops: float | None, device: torch.device) -> float | None:
    if options_tflops:
        return options_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def latest_checkpoint(out: Path) -> Path | None:
    marker = Path(out) / "checkpoints" / "latest"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.is_dir() else None


def save_model(model: LLaMA | dict[str, torch.Tensor], path: Path) -> None:
    state = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LLaMA:
    """A model from a checkpoint folder or a training output folder (its latest checkpoint)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ValueError(f"{path}: neither a checkpoint folder nor a training folder with checkpoints")
        path = ckpt
    info = json.loads((path / "trainer.json").read_text())
    model = LLaMA(ModelConfig(**info["model"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval()


def _full_state(raw: LLaMA, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return raw.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw, options=options), get_optimizer_state_dict(raw, optimizer, options=options)


def save_checkpoint(out: Path, step: int, tokens: int, raw: LLaMA, optimizer, loader: PackedLoader,
                    config: TrainConfig, rank: int, world_size: int, fsdp: bool) -> None:
    model_state, optim_state = _full_state(raw, optimizer, fsdp)  # a collective under FSDP
    data_states = [loader.state_dict()]
    if world_size > 1:
        data_states = [None] * world_size
        dist.all_gather_object(data_states, loader.state_dict())
    if rank == 0:
        root = out / "checkpoints"
        name = f"step_{step:07d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model_state, tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        for r, state in enumerate(data_states):
            (tmp / f"data_rank{r}.json").write_text(json.dumps(state))
        trainer = {"step": step, "tokens": tokens, "world_size": world_size, "model": config.model.to_dict()}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        (root / ".latest.tmp").write_text(name)
        os.replace(root / ".latest.tmp", root / "latest")
        for old in sorted(root.glob("step_*"))[: -config.train.keep_checkpoints]:
            shutil.rmtree(old)
        logger.info("checkpoint %s", root / name)
    if world_size > 1:
        dist.barrier()


def load_checkpoint(ckpt: Path, raw: LLaMA, optimizer, loader: PackedLoader, rank: int, fsdp: bool) -> dict:
    info = json.loads((ckpt / "trainer.json").read_text())
    if info["model"] != raw.config.to_dict():
        raise ValueError(f"train.out: {ckpt} holds a checkpoint of another model ({info['model']}); "
                         "use another train.out or delete it")
    model_state = load_file(str(ckpt / "model.safetensors"))
    optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw, model_state, options=options)
        set_optimizer_state_dict(raw, optimizer, optim_state, options=options)
    else:
        raw.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(optim_state)
    loader.load_state_dict(json.loads((ckpt / f"data_rank{rank}.json").read_text()))
    return info


def train(config: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) as `config` says. `stop_after`: leave after that step, as if interrupted."""
    tc = config.train
    rank, world_size, device = setup_distributed(tc.device)
    out = Path(tc.out)
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())

    raw = LLaMA(config.model).to(device)
    raw.activation_checkpointing = tc.activation_checkpointing
    fsdp = world_size > 1 and tc.parallel == "fsdp"
    model: torch.nn.Module = raw
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" and tc.dtype == "bfloat16" else MixedPrecisionPolicy()
        for block in raw.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    elif world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if tc.compile else model
    optimizer = make_optimizer(raw, config.optim, device)
    loader = PackedLoader(config.data.runs, config.data.seq_len, tc.batch_size, config.data.mixture,
                          config.data.shuffle_buffer, config.data.seed, rank, world_size)

    step, tokens = 0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        info = load_checkpoint(ckpt, raw, optimizer, loader, rank, fsdp)
        step, tokens = info["step"], info["tokens"]
        if rank == 0:
            logger.info("resumed from %s (step %d)", ckpt, step)
            if (out / "log.jsonl").is_file():  # drop steps logged after the checkpoint (an interrupted run)
                lines = (out / "log.jsonl").read_text().splitlines()
                kept = [line for line in lines if json.loads(line)["step"] <= step]
                (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))

    writer = None
    if tc.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("train.tensorboard: needs the tensorboard package (pip install tensorboard)") from err
        writer = SummaryWriter(str(out / "tensorboard"))

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tc.dtype == "bfloat16" \
        else contextlib.nullcontext()
    tokens_per_step = tc.batch_size * tc.grad_accum * config.data.seq_len * world_size
    flops_per_token = raw.flops_per_token(config.data.seq_len)
    peak = peak_flops(tc.peak_tflops, device)
    if rank == 0:
        logger.info("model %s: %.1fM parameters; %d tokens per step on %d rank(s), %s", config.size,
                    raw.num_params() / 1e6, tokens_per_step, world_size, device)
    log_path = out / "log.jsonl"
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # steps since the last log line
    t_last, steps_since = time.time(), 0
    last_saved = step
    model.train()
    while step < tc.max_steps:
        lr = lr_at(step, config.optim, tc.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == tc.grad_accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                _, loss = forward(x, y)
            (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), config.optim.grad_clip) \
            if config.optim.grad_clip > 0 else torch.zeros((), device=device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        steps_since += 1
        loss_value = loss_sum / tc.grad_accum
        if world_size > 1:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                loss_value /= world_size
        # Losses stay on the device until the next log step: no host sync per step.
        pending.append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.detach(), "tokens": tokens})
        is_last = step == tc.max_steps or (stop_after is not None and step >= stop_after)
        if step % tc.log_every == 0 or is_last:
            values = torch.stack([torch.stack([r["loss"].float(), _local(r["grad_norm"]).float()]) for r in pending])
            values = values.cpu().tolist()  # the one sync of this log window
            elapsed = time.time() - t_last
            for r, (loss_v, norm_v) in zip(pending, values):
                r["loss"], r["grad_norm"] = loss_v, norm_v
            record = pending[-1]
            record["tokens_per_s"] = steps_since * tokens_per_step / elapsed
            record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * world_size) if peak else None
            t_last, steps_since = time.time(), 0
            history.extend(pending)
            if rank == 0:
                mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
                logger.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  MFU %s", step, tc.max_steps, record["loss"],
                            lr, record["tokens_per_s"], mfu)
                with log_path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in pending)
                if writer:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        writer.add_scalar(f"train/{key}", record[key], step)
            pending = []
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save_checkpoint(out, step, tokens, raw, optimizer, loader, config, rank, world_size, fsdp)
            last_saved = step
        if stop_after is not None and step >= stop_after:
            break
    if step != last_saved:
        save_checkpoint(out, step, tokens, raw, optimizer, loader, config, rank, world_size, fsdp)
    shares = realized_shares(loader, world_size, device)
    if rank == 0:
        logger.info("realized token shares: %s", ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    if writer:
        writer.close()
    return {"step": step, "tokens": tokens, "history": history, "token_shares": shares,
            "weights": {c.key: c.weight for c in loader.components}, "out": str(out)}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's grad norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def realized_shares(loader: PackedLoader, world_size: int, device: torch.device) -> dict[str, float]:
    drawn = torch.tensor(loader.drawn, dtype=torch.float64)
    if world_size > 1:
        drawn = drawn.to(device)
        dist.all_reduce(drawn)
        drawn = drawn.cpu()
    total = float(drawn.sum()) or 1.0
    return {c.key: float(n) / total for c, n in zip(loader.components, drawn)}
