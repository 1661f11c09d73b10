"""Train a VQGAN tokenizer (SPEC.md architecture family) on the images of any UVD source.

    uvd tokenizer train recipes/tokenizer/demo_small.yaml [--set train.steps=100 ...]
    torchrun --nproc_per_node=8 -m uvd.cli tokenizer train RECIPE        # DDP (nccl on GPU, gloo on CPU)

L1 reconstruction + codebook/commitment losses, a PatchGAN discriminator after `train.gan_start`,
optional LPIPS perceptual loss (user weights), dead-code restarts. Writes `OUT/checkpoint.pt`
(resumable) and `OUT/tokenizer/` (config.json + model.safetensors, loadable by `tokenizer.weights`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml

from uvd.tokenizer.checkpoints import load_tokenizer
from uvd.tokenizer.losses import PatchDiscriminator, PerceptualLoss, discriminator_loss, generator_loss
from uvd.tokenizer.train_config import DataEntry, TokenizerTrainConfig, TrainOptions, load_train_config  # noqa: F401  (re-exported)
from uvd.tokenizer.vqgan import VQGAN, build_vqgan, resolve_config, save_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


# ---------------------------------------------------------------- images


def is_held_out(key: str, share: float) -> bool:
    """Deterministic split by key: the same image is always on the same side."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < share


class SourceImages:
    """256x256 uint8 images from the UVD sources named by `entries`, read in-process with each
    source's `read_unit` and the shared decode/resize; rejects are counted, never substituted."""

    def __init__(self, entries: list[DataEntry], holdout_share: float, split: str, rank: int = 0, world_size: int = 1):
        from uvd.recipe import load_recipe
        from uvd.registry import get_source

        if split not in ("train", "heldout"):
            raise ValueError(f"split must be train or heldout, got {split!r}")
        self.holdout_share, self.split, self.rank, self.world_size = holdout_share, split, rank, world_size
        self.units: list[tuple[Any, Any, str]] = []  # (source, recipe, unit)
        for entry in entries:
            overrides = list(entry.overrides)
            if entry.inputs is not None:
                overrides.append(f"inputs={json.dumps(entry.inputs)}")
            recipe = load_recipe(entry.recipe, overrides)
            source = get_source(recipe.source)(recipe)
            self.units += [(source, recipe, unit) for unit in source.list_units()]
        self.rejected: dict[str, int] = {}

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(key, (256, 256, 3) uint8) of this split and this rank, in input order."""
        from uvd.records import RejectError
        from uvd.work import preprocess_item  # the decode path of runs and tests/plain_run.py

        by_unit = len(self.units) >= self.world_size
        index = 0
        for u, (source, recipe, unit) in enumerate(self.units):
            if by_unit and u % self.world_size != self.rank:
                continue
            for item in source.read_unit(unit):
                key = f"{recipe.source}:{item.key}"
                if is_held_out(key, self.holdout_share) != (self.split == "heldout"):
                    continue
                if item.reject:
                    self.rejected[item.reject] = self.rejected.get(item.reject, 0) + 1
                    continue
                index += 1
                if not by_unit and (index - 1) % self.world_size != self.rank:
                    continue
                try:
                    pixels = preprocess_item(item, recipe.image, recipe.filters)[0]
                except RejectError as err:
                    self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
                    continue
                yield key, pixels

    def load_all(self) -> tuple[list[str], np.ndarray]:
        keys, images = [], []
        for key, pixels in self:
            keys.append(key)
            images.append(pixels)
        return keys, np.stack(images) if images else np.zeros((0, 256, 256, 3), np.uint8)


def batches(images: SourceImages, batch_size: int, crop: int, seed: int, cache: bool) -> Iterator[torch.Tensor]:
    """Endless (B, 3, crop, crop) float batches in [0, 1]: shuffle buffer, random crop and flip."""
    rng = np.random.default_rng(seed)
    cached: list[np.ndarray] | None = None
    epoch = 0
    while True:
        if cached is not None:
            pool = [cached[i] for i in rng.permutation(len(cached))]
        else:
            pool = [pixels for _, pixels in images]
            if cache:
                cached = pool
            pool = [pool[i] for i in rng.permutation(len(pool))]
        if not pool:
            raise ValueError("no training images: every input was rejected or held out (check data and holdout_share)")
        if epoch == 0:
            logger.info("training on %d images per epoch (rejected: %s)", len(pool), images.rejected or "none")
        epoch += 1
        for start in range(0, len(pool) - batch_size + 1 if len(pool) >= batch_size else 1, batch_size):
            chunk = pool[start:start + batch_size]
            while len(chunk) < batch_size:
                chunk = chunk + chunk[: batch_size - len(chunk)]
            out = np.empty((batch_size, crop, crop, 3), np.uint8)
            for i, img in enumerate(chunk):
                y, x = rng.integers(0, img.shape[0] - crop + 1), rng.integers(0, img.shape[1] - crop + 1)
                tile = img[y:y + crop, x:x + crop]
                out[i] = tile[:, ::-1] if rng.random() < 0.5 else tile
            yield torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------- training


def restart_dead_codes(model: VQGAN, usage: torch.Tensor, latents: torch.Tensor, below: int,
                       generator: torch.Generator, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Re-initialise codes used fewer than `below` times from random encoder outputs (+ small noise).

    latents: (B, C, h, w) after quant_conv. Returns the number of codes restarted. Adam state of the
    restarted rows is zeroed so old momentum does not pull them away at once."""
    dead = torch.nonzero(usage < below).flatten()
    if dead.numel() == 0:
        return 0
    flat = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator)
    noise = torch.randn(dead.numel(), flat.shape[1], generator=generator) * (flat.std() * 0.01 + 1e-6)
    weight = model.quantize.embedding.weight
    with torch.no_grad():
        weight[dead.to(weight.device)] = (flat.cpu()[pick] + noise).to(weight.device, weight.dtype)
    if optimizer is not None:
        state = optimizer.state.get(weight, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][dead.to(weight.device)] = 0.0
    return int(dead.numel())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [0, 1]."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def evaluate_tokenizer(model: VQGAN, images: np.ndarray, batch_size: int = 16, device: str = "cpu") -> dict[str, Any]:
    """Reconstruction through the tokens (encode -> ids -> decode, uint8 output as the pipeline
    stores it) of (N, H, W, 3) uint8 images: mean PSNR and the code usage of their tokens."""
    from uvd.audit import codebook_stats

    model = model.eval()
    counts = np.zeros(model.config.num_embeddings, np.int64)
    values = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        ids = model.encode(x)
        rec = (model.decode(ids) * 255.0).round() / 255.0
        values.append(psnr(rec, x).cpu())
        counts += np.bincount(ids.flatten().cpu().numpy(), minlength=len(counts))
    book = codebook_stats(counts, len(counts))
    return {
        "images": int(len(images)),
        "psnr": float(torch.cat(values).mean()) if values else float("nan"),
        "tokens": book["tokens"],
        "used_codes": book["used_codes"],
        "dead_share": book["dead_share"],
        "perplexity": book["perplexity"],
    }


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world_size, torch.device("cuda", local)
    return rank, world_size, torch.device(device)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Run the training described by `cfg`; returns a summary (steps, last losses, held-out metrics)."""
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    t = cfg.train
    rank, world_size, device = _setup_distributed(t.device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if cfg.init:
        model, model_cfg = load_tokenizer(cfg.init)
    else:
        model_cfg = resolve_config(cfg.model)
        model = build_vqgan(model_cfg, cfg.seed)
    model = model.to(device).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        disc = PatchDiscriminator(t.disc_channels, t.disc_layers).to(device).train()
    perceptual = PerceptualLoss(t.perceptual_weights).to(device) if t.perceptual_weight > 0 else None
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_lr, betas=tuple(t.betas))
    num_codes = model_cfg.num_embeddings
    usage = torch.zeros(num_codes, dtype=torch.long)
    step = 0
    ckpt_path = out / CHECKPOINT_FILE
    if t.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        usage = state["usage"].long()
        step = int(state["step"])
        logger.info("resumed from %s at step %d", ckpt_path, step)

    gen_model, gen_disc = model, disc
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        gen_model, gen_disc = DDP(model, device_ids=ids), DDP(disc, device_ids=ids)

    images = SourceImages(cfg.data, cfg.holdout_share, "train", rank, world_size)
    # The data order depends on (seed, rank, step at start), so a resumed run does not replay the same batches.
    stream = batches(images, t.batch_size, t.crop_size, cfg.seed * 1000 + rank + 7919 * step, t.cache_images)
    restart_gen = torch.Generator().manual_seed(cfg.seed + 2 + step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
    log_path = out / "train_log.jsonl"
    last: dict[str, float] = {}
    start_time, start_step = time.time(), step
    while step < t.steps:
        x = next(stream).to(device, non_blocking=True)
        gan_on = step >= t.gan_start
        with autocast:
            res = gen_model(x)
            rec = res.reconstruction.float()
            rec_loss = (rec - x).abs().mean()
            loss = rec_loss + t.codebook_weight * res.loss.float()
            if perceptual is not None:
                p_loss = perceptual(rec, x)
                loss = loss + t.perceptual_weight * p_loss
            if gan_on:
                disc.requires_grad_(False)
                g_loss = generator_loss(gen_disc(rec).float(), t.gan_loss)
                disc.requires_grad_(True)
                loss = loss + t.gan_weight * g_loss
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt_g.step()
        if gan_on:
            with autocast:
                d_loss = discriminator_loss(gen_disc(x).float(), gen_disc(rec.detach()).float(), t.gan_loss)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        usage += torch.bincount(res.ids.flatten().cpu(), minlength=num_codes)
        step += 1
        restarted = 0
        if t.restart_every and step % t.restart_every == 0:
            if world_size > 1:
                usage_all = usage.to(device)
                dist.all_reduce(usage_all)
                usage = usage_all.cpu()
            if rank == 0:
                restarted = restart_dead_codes(model, usage, res.latents, t.restart_below, restart_gen, opt_g)
            if world_size > 1:
                dist.broadcast(model.quantize.embedding.weight.data, 0)
                if rank != 0:  # keep Adam state of the restarted rows consistent with rank 0
                    dead = torch.nonzero(usage < t.restart_below).flatten().to(device)
                    for name in ("exp_avg", "exp_avg_sq"):
                        state = opt_g.state.get(model.quantize.embedding.weight, {})
                        if name in state:
                            state[name][dead] = 0.0
            usage.zero_()

        last = {"step": step, "loss": loss.item(), "rec_l1": rec_loss.item(), "vq": res.loss.item(),
                "psnr": float(psnr(rec.detach().clamp(0, 1), x).mean())}
        if gan_on:
            last.update(g_loss=g_loss.item(), d_loss=d_loss.item())
        if restarted:
            last["restarted_codes"] = restarted
        if rank == 0 and (step % t.log_every == 0 or step == t.steps or restarted):
            rate = (step - start_step) / max(time.time() - start_time, 1e-9)
            logger.info("step %d/%d %s (%.2f steps/s)", step, t.steps,
                        " ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"), rate)
            with log_path.open("a") as f:
                f.write(json.dumps({**last, "time": round(time.time() - start_time, 2)}) + "\n")
        if rank == 0 and (step % t.checkpoint_every == 0 or step == t.steps):
            save_checkpoint(out, model, disc, opt_g, opt_d, usage, step, cfg)

    summary: dict[str, Any] = {"out": str(out), "step": step, "last": last, "tokenizer": str(out / "tokenizer")}
    if rank == 0:
        if not (out / "tokenizer").is_dir():
            save_tokenizer(model, model_cfg, out / "tokenizer")
        if cfg.holdout_share > 0:
            _, held = SourceImages(cfg.data, cfg.holdout_share, "heldout").load_all()
            summary["heldout"] = evaluate_tokenizer(model, held, device=str(device))
            model.train()
            (out / "heldout.json").write_text(json.dumps(summary["heldout"], indent=2) + "\n")
    if world_size > 1:
        dist.barrier()
    return summary


def save_checkpoint(out: Path, model: VQGAN, disc, opt_g, opt_d, usage: torch.Tensor, step: int, cfg: TokenizerTrainConfig) -> None:
    state = {"model": model.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
             "opt_d": opt_d.state_dict(), "usage": usage.clone(), "step": step}
    _atomic_save(state, out / CHECKPOINT_FILE)
    save_tokenizer(model, model.config, out / "tokenizer")
    logger.info("checkpoint at step %d -> %s", step, out)
