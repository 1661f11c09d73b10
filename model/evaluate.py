"""Evaluation with the LVM protocol, and data ablations.

    uvd eval OUT_OR_CHECKPOINT --data HELD_OUT_RUN ... [--json]
    uvd ablate recipes/train/tiny.yaml --leave-out imagenet_groups

Per task, on held-out shards: annotated pairs ({x1, y1, ...}): 5 (input, annotation) pairs and
a query image as the prompt (11 images), perplexity of the query's annotation (256 tokens);
video tasks (`video_*`): 15 frames, perplexity of the next frame. In-context sentences with text
(`incontext_*`, split along their `meta.layout`): every segment before the query's last one is the
prompt; `incontext_caption` scores the query's caption tokens, `incontext_segmentation` the query's
mask tokens. Plus the overall perplexity of packed held-out windows.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from uvd.model.config import BOS_ID, TOKENS_PER_IMAGE, TrainConfig, train_config_from_dict
from uvd.model.data import PackedLoader, check_vocab_size, iter_rows
from uvd.model.llama import LLaMA

logger = logging.getLogger(__name__)

NUM_PAIRS = 5  # in-context (input, annotation) pairs
NUM_VIDEO_CONTEXT = 15  # frames before the predicted one


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def task_kind(task: str) -> str | None:
    """'video' (frames -> next frame), 'pairs' ({x1, y1, ...} layout), 'incontext' (the last segment
    of a sentence with text) or None (not evaluated per task)."""
    if task.startswith("incontext"):
        return "incontext"
    if task.startswith("video"):
        return "video"
    if task == "single" or task.startswith(("category", "multiview")):
        return None
    return "pairs"


def eval_examples(runs: list[str | Path], max_per_task: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """task -> [(context tokens, target tokens)], the first `max_per_task` long-enough sentences of each task."""
    examples: dict[str, list] = {}

    def want(task: str) -> bool:
        return task_kind(task) is not None and len(examples.get(task, [])) < max_per_task

    for _, task, tokens, meta in iter_rows(runs, want):
        if task_kind(task) == "incontext":
            layout = meta.get("layout")
            if layout and len(layout) >= 2 and sum(n for _, n in layout) == len(tokens):
                split = len(tokens) - layout[-1][1]
                examples.setdefault(task, []).append((tokens[:split], tokens[split:]))
            continue
        num_context = NUM_VIDEO_CONTEXT if task_kind(task) == "video" else 2 * NUM_PAIRS + 1
        if len(tokens) >= (num_context + 1) * TOKENS_PER_IMAGE:
            split = num_context * TOKENS_PER_IMAGE
            examples.setdefault(task, []).append((tokens[:split], tokens[split : split + TOKENS_PER_IMAGE]))
    return examples


@torch.no_grad()
def target_perplexity(model: LLaMA, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 4) -> float:
    """exp(mean NLL) of the target tokens given `[BOS] context`; batches hold examples of one shape
    (in-context captions differ in length)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    shapes: dict[tuple[int, int], list] = {}
    for c, t in examples:
        shapes.setdefault((len(c), len(t)), []).append((c, t))
    batches = [group[i : i + batch_size] for group in shapes.values() for i in range(0, len(group), batch_size)]
    for batch in batches:
        ids = torch.tensor(np.stack([np.concatenate([[BOS_ID], c, t]) for c, t in batch]), dtype=torch.long, device=device)
        x, y = ids[:, :-1], ids[:, 1:].clone()
        num_target = len(batch[0][1])
        y[:, : y.shape[1] - num_target] = -100
        with _autocast(device):
            logits, _ = model(x)
        nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += num_target * len(batch)
    return math.exp(nll / count)


@torch.no_grad()
def heldout_perplexity(model: LLaMA, runs: list[str | Path], seq_len: int, num_windows: int, batch_size: int = 4) -> float:
    """Perplexity of the first `num_windows` packed windows (natural mix, seed 0) of the held-out runs."""
    device = next(model.parameters()).device
    loader = PackedLoader(runs, seq_len, batch_size, shuffle_buffer=1, seed=0, include_incomplete=True)
    losses = []
    for _ in range(math.ceil(num_windows / batch_size)):
        x, y = loader.next_batch()
        with _autocast(device):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    return math.exp(sum(losses) / len(losses))


def heldout_seq_len(model: LLaMA) -> int:
    """The window length a model was trained at (`load_model` reads it from the checkpoint), so
    `uvd eval` and the eval after `uvd train` score the same windows; else max_seq_len, with a warning."""
    seq_len = getattr(model, "trained_seq_len", None)
    if seq_len:
        return int(seq_len)
    logger.warning("the model's training seq_len is unknown (no trainer.json or config.yaml saying it): "
                   "scoring held-out windows at max_seq_len %d", model.config.max_seq_len)
    return model.config.max_seq_len


def evaluate(model: LLaMA, runs: list[str | Path], max_prompts_per_task: int = 20, num_windows: int = 8,
             batch_size: int = 4, seq_len: int | None = None) -> dict[str, Any]:
    check_vocab_size(model.config.vocab_size, runs)  # a pixel-only model cannot read text ids
    was_training = model.training
    model.eval()
    tasks = {}
    for task, examples in sorted(eval_examples(runs, max_prompts_per_task).items()):
        tasks[task] = {"kind": task_kind(task), "prompts": len(examples),
                       "perplexity": target_perplexity(model, examples, batch_size)}
    seq_len = seq_len or heldout_seq_len(model)
    heldout = {"windows": num_windows, "seq_len": seq_len,
               "perplexity": heldout_perplexity(model, runs, seq_len, num_windows, batch_size)}
    model.train(was_training)
    return {"tasks": tasks, "heldout": heldout}


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """Perplexity per task (rows) and variant (columns), side by side."""
    names = list(results)
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    width = max([12, *map(len, names)]) + 2
    label = max([24, *(len(t) + 2 for t in tasks)])
    lines = ["perplexity".ljust(label) + "".join(n.rjust(width) for n in names)]
    for task in tasks:
        cells = [f"{r['tasks'][task]['perplexity']:.2f}" if task in r["tasks"] else "-" for r in results.values()]
        lines.append(task.ljust(label) + "".join(c.rjust(width) for c in cells))
    cells = [f"{r['heldout']['perplexity']:.2f}" for r in results.values()]
    lines.append("held-out (all tokens)".ljust(label) + "".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def ablation_variants(config: TrainConfig, leave_out: list[str]) -> dict[str, TrainConfig]:
    """'all', one variant per left-out component (SOURCE or SOURCE/TASK) and one per entry of
    `eval.variants` (dotted keys set on top of the config: dense vs MoE, mixed vs task batches),
    each in its own folder `train.out/NAME`."""
    base = Path(config.train.out)
    variants = {"all": copy.deepcopy(config)}  # copies: the caller's config is left as it was
    for key in leave_out:
        variant = copy.deepcopy(config)
        variant.data.mixture = {k: v for k, v in variant.data.mixture.items() if not k.startswith(f"{key}/")}
        variant.data.mixture[key] = 0.0
        variants[f"no_{key.replace('/', '_')}"] = variant
    for name, changes in config.eval.variants.items():
        if name in variants:
            raise ValueError(f"eval.variants.{name}: the name of another variant")
        data = config.to_dict()
        data["eval"]["variants"] = {}
        for key, value in changes.items():
            *sections, last = key.split(".")
            node = data
            for part in sections:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"eval.variants.{name}.{key}: {part} is not a section")
            node[last] = value
        try:
            variants[name] = train_config_from_dict(data)
        except ValueError as err:
            raise ValueError(f"eval.variants.{name}: {err}") from err
    for name, variant in variants.items():
        variant.train.out = str(base / name)
    return variants


def ablate(config: TrainConfig, leave_out: list[str], eval_runs: list[str] | None = None) -> dict[str, Any]:
    """Train one run per variant, everything else equal, and evaluate each on the same held-out runs."""
    from uvd.model.checkpoint import load_model
    from uvd.model.train import train

    eval_runs = eval_runs or config.eval.runs or config.data.runs
    results = {}
    for name, variant in ablation_variants(config, leave_out).items():
        logger.info("ablation variant %s -> %s", name, variant.train.out)
        summary = train(variant)
        model = load_model(variant.train.out)
        results[name] = evaluate(model, eval_runs, config.eval.max_prompts_per_task, config.eval.num_windows,
                                 config.eval.batch_size, variant.data.seq_len)
        results[name]["token_shares"] = summary["token_shares"]
    return results
