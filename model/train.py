"""The LVM trainer: AdamW with warmup + cosine decay, grad clipping and accumulation, bf16 autocast,
checkpoints with exact resume, validation during training, and DDP or FSDP when run under torchrun.

    uvd train recipes/train/tiny.yaml --set data.runs=[out/laion] --set train.max_steps=200
    torchrun --nproc_per_node 8 -m uvd.cli train recipes/train/lvm_300m.yaml --set train.parallel=fsdp

Checkpoints (model/checkpoint.py) are sharded with PyTorch Distributed Checkpoint and hold the
global data position, so running the same command again resumes from `OUT/checkpoints/latest`
at the exact next batch, on the same or another number of ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from uvd.model.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, save_model  # noqa: F401
from uvd.model.config import OptimOptions, TrainConfig
from uvd.model.data import PackedLoader, Prefetcher, fit_vocab_size, shares_of
from uvd.model.llama import LLaMA

logger = logging.getLogger(__name__)

# Dense bf16 peak per device, for MFU (no sparsity). Longer names first: "H100 PCIe" before "H100".
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


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


class TaskGradBalance:
    """Per-task gradient balancing for task-homogeneous steps (`train.task_grad_balance`).

    Each task t keeps an exponential moving average m_t (beta 0.9, bias-corrected like Adam's
    moments) of the global L2 norm of its steps' gradients, before clipping. A step of task t has
    its gradient multiplied by mean(m over the tasks seen so far) / m_t: every task moves the
    weights by the same typical amount, whatever the scale of its loss, so a task with large
    gradients does not dominate Adam's second moments. Only the scale changes, not the direction."""

    def __init__(self, num_tasks: int, beta: float = 0.9):
        self.beta = beta
        self.ema = [0.0] * num_tasks
        self.count = [0] * num_tasks

    def apply(self, params: list[torch.nn.Parameter], task: int) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(_local(torch.nn.utils.get_total_norm(grads)))  # one host sync per step
        self.count[task] += 1
        self.ema[task] = self.beta * self.ema[task] + (1 - self.beta) * norm
        corrected = [e / (1 - self.beta ** c) for e, c in zip(self.ema, self.count) if c]
        scale = (sum(corrected) / len(corrected)) / (self.ema[task] / (1 - self.beta ** self.count[task]))
        if not math.isfinite(scale) or scale <= 0:  # a zero gradient: leave it
            return 1.0
        for g in grads:
            g.mul_(scale)
        return scale

    def state_dict(self) -> dict[str, Any]:
        return {"ema": list(self.ema), "count": list(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["ema"]) != len(self.ema):
            raise ValueError("train.task_grad_balance: the checkpoint's tasks differ from the data's")
        self.ema, self.count = list(state["ema"]), list(state["count"])


def _forward_backward(model: torch.nn.Module, forward, x, y, autocast, scale: float, sync: bool) -> torch.Tensor:
    """One micro-batch; gradients are reduced across ranks only when `sync` (the last micro-batch):
    DDP's no_sync(), FSDP2's set_requires_gradient_sync(False) otherwise."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        context = contextlib.nullcontext() if sync else model.no_sync()
    else:
        context = contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: no reduce-scatter on the other micro-batches
            model.set_requires_gradient_sync(sync)
    with context:
        with autocast:
            _, loss = forward(x, y)
        (loss * scale).backward()
    return loss.detach()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, config: TrainConfig, rank: int, world_size: int, device: torch.device,
                    autocast) -> float:
    """Mean loss over the first `train.eval_batches` global batches of packed windows of `eval.runs`
    (natural mix, seed 0: the same windows at every validation), averaged over ranks."""
    loader = PackedLoader(config.eval.runs, config.data.seq_len, config.train.batch_size, shuffle_buffer=1, seed=0,
                          rank=rank, world_size=world_size, include_incomplete=True)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(config.train.eval_batches):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    total /= config.train.eval_batches
    if world_size > 1:
        dist.all_reduce(total)
        total /= world_size
    model.train(was_training)
    return float(total)


def train(config: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) as `config` says. `stop_after`: leave after that step, as if interrupted."""
    tc = config.train
    rank, world_size, device = setup_distributed(tc.device)
    out = Path(tc.out)
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fit_vocab_size(config.model, config.data.runs + config.eval.runs)  # text ids: 8292 + the text vocabulary
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())

    raw = LLaMA(config.model).to(device)
    raw.activation_checkpointing = tc.activation_checkpointing
    raw.loss_chunk = tc.loss_chunk
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
                          config.data.shuffle_buffer, config.data.seed, rank, world_size, config.data.include_incomplete,
                          config.data.batching, config.data.task_alpha, batches_per_task=tc.grad_accum)
    keys = [c.key for c in loader.components]
    balance = TaskGradBalance(len(keys)) if tc.task_grad_balance else None

    step, tokens = 0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        info = load_checkpoint(ckpt, raw, optimizer)
        loader.load_state_dict(info["data"])
        step, tokens = info["step"], info["tokens"]
        if balance is not None:
            balance.load_state_dict(info["task_grad_balance"])
        if rank == 0:
            logger.info("resumed from %s (step %d, written by %d rank(s); now %d)", ckpt, step,
                        info.get("world_size", 1), world_size)
            if (out / "log.jsonl").is_file():  # drop steps logged after the checkpoint (an interrupted run)
                lines = (out / "log.jsonl").read_text().splitlines()
                kept = [line for line in lines if json.loads(line)["step"] <= step]
                (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
    batches = Prefetcher(loader, config.data.prefetch, pin=device.type == "cuda") if config.data.prefetch else loader

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
    validate = bool(tc.eval_every and config.eval.runs)
    if rank == 0:
        logger.info("model %s: %.1fM parameters; %d tokens per step on %d rank(s), %s", config.size,
                    raw.num_params() / 1e6, tokens_per_step, world_size, device)
    log_path = out / "log.jsonl"
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # steps since the last log line
    t_last, steps_since, loader_s = time.perf_counter(), 0, 0.0
    last_saved = step
    model.train()
    try:
        while step < tc.max_steps:
            lr = lr_at(step, config.optim, tc.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                t0 = time.perf_counter()
                x, y = batches.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loader_s += time.perf_counter() - t0
                loss_sum += _forward_backward(model, forward, x, y, autocast, 1.0 / tc.grad_accum,
                                              sync=micro == tc.grad_accum - 1)
            task = batches.batch_task
            if balance is not None:
                balance.apply(list(raw.parameters()), keys.index(task))
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
            pending.append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.detach(), "tokens": tokens,
                            **({"task": task} if task is not None else {})})
            is_last = step == tc.max_steps or (stop_after is not None and step >= stop_after)
            if step % tc.log_every == 0 or is_last:
                values = torch.stack([torch.stack([r["loss"].float(), _local(r["grad_norm"]).float()]) for r in pending])
                values = values.cpu().tolist()  # the one sync of this log window
                elapsed = time.perf_counter() - t_last
                for r, (loss_v, norm_v) in zip(pending, values):
                    r["loss"], r["grad_norm"] = loss_v, norm_v
                record = pending[-1]
                record["step_time_s"] = elapsed / steps_since  # measured, checkpoints and validation left out
                record["tokens_per_s"] = steps_since * tokens_per_step / elapsed
                record["loader_share"] = loader_s / elapsed  # the training thread's wait for batches
                record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * world_size) if peak else None
                steps_since, loader_s = 0, 0.0
                history.extend(pending)
                if rank == 0:
                    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
                    logger.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.3fs/step  loader %.1f%%  MFU %s", step,
                                tc.max_steps, record["loss"], lr, record["tokens_per_s"], record["step_time_s"],
                                100 * record["loader_share"], mfu)
                if writer:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loader_share"):
                        writer.add_scalar(f"train/{key}", record[key], step)
                    if record["mfu"] is not None:
                        writer.add_scalar("train/mfu", record["mfu"], step)
            t_aside = time.perf_counter()  # validation and checkpoints stay out of the measured step time
            if validate and (step % tc.eval_every == 0 or is_last):
                val = validation_loss(model, config, rank, world_size, device, autocast)
                (pending[-1] if pending else history[-1])["val_loss"] = val
                if rank == 0:
                    logger.info("step %d  validation loss %.4f on %s", step, val, ", ".join(config.eval.runs))
                if writer:
                    writer.add_scalar("val/loss", val, step)
            if pending and (step % tc.log_every == 0 or is_last):
                if rank == 0:
                    with log_path.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in pending)
                pending = []
            if step % tc.ckpt_every == 0 or step == tc.max_steps:
                save_checkpoint(out, step, tokens, raw, optimizer, batches.state_dict(), config.data.seq_len,
                                tc.keep_checkpoints, export=step == tc.max_steps, extra=_extra(balance))
                last_saved = step
            if stop_after is not None and step >= stop_after:
                break
            if step % tc.log_every == 0:
                t_last = time.perf_counter()
            else:
                t_last += time.perf_counter() - t_aside
        if step != last_saved:
            save_checkpoint(out, step, tokens, raw, optimizer, batches.state_dict(), config.data.seq_len,
                            tc.keep_checkpoints, export=step == tc.max_steps, extra=_extra(balance))
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
    shares = shares_of(batches.components, batches.drawn)  # the global stream: the same on every rank
    if rank == 0:
        logger.info("realized token shares: %s", ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    if writer:
        writer.close()
    return {"step": step, "tokens": tokens, "history": history, "token_shares": shares,
            "weights": {c.key: c.weight for c in loader.components}, "out": str(out)}


def _extra(balance: TaskGradBalance | None) -> dict[str, Any]:
    return {"task_grad_balance": balance.state_dict()} if balance is not None else {}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's grad norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
