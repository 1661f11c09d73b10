"""Checkpoints: the sharded training state (PyTorch Distributed Checkpoint), the final weights as
safetensors, and `load_model` for evaluation, prompting and export (which never import the trainer).

    OUT/checkpoints/step_NNNNNNN/state/           model + optimizer; each rank writes its own shards
                                 data.json        the loader position (the same for any number of ranks)
                                 trainer.json     step, tokens, seq_len, world_size, model config
                                 model.safetensors  full weights, written with the last checkpoint of a run
    OUT/checkpoints/latest                        the newest checkpoint's name

Under FSDP no rank gathers the full state for a training checkpoint, and a resume loads only the
shards each rank holds, on any number of ranks (DCP reshards). DDP and single-process runs use the
same layout (DCP writes a replicated tensor once).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from uvd.model.config import ModelConfig
from uvd.model.llama import LLaMA

logger = logging.getLogger(__name__)

STATE_DIR = "state"
WEIGHTS_FILE = "model.safetensors"


def latest_checkpoint(out: str | Path) -> Path | None:
    marker = Path(out) / "checkpoints" / "latest"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a training folder's latest checkpoint."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: neither a checkpoint folder nor a training folder with checkpoints")
    return ckpt


def checkpoint_info(ckpt: str | Path) -> dict[str, Any]:
    """trainer.json of a checkpoint, with `seq_len` (the window length it was trained at) filled in
    from the training folder's config.yaml for checkpoints written before trainer.json held it."""
    ckpt = Path(ckpt)
    info = json.loads((ckpt / "trainer.json").read_text())
    if info.get("seq_len") is None:
        config_path = ckpt.parent.parent / "config.yaml"
        if config_path.is_file():
            info["seq_len"] = ((yaml.safe_load(config_path.read_text()) or {}).get("data") or {}).get("seq_len")
    return info


def save_model(model: LLaMA | dict[str, torch.Tensor], path: str | Path) -> None:
    state = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LLaMA:
    """A model from a checkpoint folder or a training folder (its latest checkpoint), in eval mode.
    `model.trained_seq_len` is the window length it was trained at (None if unknown)."""
    ckpt = resolve_checkpoint(path)
    info = checkpoint_info(ckpt)
    model = LLaMA(ModelConfig(**info["model"]))
    if (ckpt / WEIGHTS_FILE).is_file():
        model.load_state_dict(load_file(str(ckpt / WEIGHTS_FILE)), strict=True)
    elif (ckpt / STATE_DIR).is_dir():  # an intermediate checkpoint: read the weights out of the DCP shards
        state = {"model": model.state_dict()}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt / STATE_DIR), no_dist=True)
        model.load_state_dict(state["model"], strict=True)
    else:
        raise ValueError(f"{ckpt}: holds neither {WEIGHTS_FILE} nor a {STATE_DIR}/ folder")
    model.trained_seq_len = info.get("seq_len")
    return model.to(device).eval()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it 'assumes the intent is to save in a single process': that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(out: str | Path, step: int, tokens: int, raw: LLaMA, optimizer: torch.optim.Optimizer,
                    data_state: dict[str, Any], seq_len: int, keep: int, export: bool = False,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint on every rank (a collective under torchrun): each rank its own shards of
    the model and optimizer state; rank 0 the data position and trainer.json, and with `export`
    the full weights as safetensors. The folder appears (renamed from a temp name) only when complete."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    root = Path(out) / "checkpoints"
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    if world_size > 1:
        dist.barrier()
    model_state, optim_state = get_state_dict(raw, optimizer)  # local shards (DTensors under FSDP): no gather
    with _single_process_ok():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / STATE_DIR),
                 no_dist=world_size == 1)
    full = None
    if export:  # the one full gather of a run, for the final weights
        full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if full is not None:
            save_model(full, tmp / WEIGHTS_FILE)
        (tmp / "data.json").write_text(json.dumps(data_state))
        trainer = {"step": step, "tokens": tokens, "seq_len": seq_len, "world_size": world_size,
                   "model": raw.config.to_dict(), **(extra or {})}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        (root / ".latest.tmp").write_text(name)
        os.replace(root / ".latest.tmp", root / "latest")
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
        logger.info("checkpoint %s", root / name)
    if world_size > 1:
        dist.barrier()
    return root / name


def load_checkpoint(ckpt: str | Path, raw: LLaMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the model and optimizer state into `raw` (plain, DDP's module or FSDP-sharded) on every
    rank, each reading only the shards it holds; -> trainer.json plus `data` (the loader position)."""
    ckpt = Path(ckpt)
    info = checkpoint_info(ckpt)
    if ModelConfig(**info["model"]).to_dict() != raw.config.to_dict():  # fields added since are at their defaults
        raise ValueError(f"train.out: {ckpt} holds a checkpoint of another model ({info['model']}); "
                         "use another train.out or delete it")
    if not (ckpt / STATE_DIR).is_dir():
        raise ValueError(f"train.out: {ckpt} has no {STATE_DIR}/ (a checkpoint of an older trainer); "
                         "use another train.out or delete it")
    model_state, optim_state = get_state_dict(raw, optimizer)  # templates with this run's sharding
    state = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(ckpt / STATE_DIR), no_dist=not _distributed() or dist.get_world_size() == 1)
    set_state_dict(raw, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    info["data"] = json.loads((ckpt / "data.json").read_text())
    return info
