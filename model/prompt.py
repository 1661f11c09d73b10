"""Prompting a trained LVM: sequential (frames -> next frames) and analogy (pairs + query -> answer).

    uvd prompt OUT --data RUN --mode analogy --task colorization --out sheet.png
    uvd prompt OUT --data RUN --mode sequential --task video_s10 --context 4 --generate 2

Prompts come from a sentence of the shards; tokens are sampled one by one (temperature, top-k,
top-p) with a KV cache, only among visual ids, decoded to pixels by the registered tokenizer
stage (the one that made the shards, read from the run's `_recipe.yaml`, unless given) and
written as a contact sheet: the prompt row, then the generated images next to the true ones.
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from uvd.model.config import BOS_ID, NUM_VISUAL_TOKENS, TOKENS_PER_IMAGE
from uvd.model.data import discover_runs, iter_sentences
from uvd.model.llama import LLaMA
from uvd.tokenizer.runs import load_run_tokenizer
from uvd.manifest import recipe_tokenizer_section
from uvd.registry import get_tokenizer_stage, register_trainer_demo

logger = logging.getLogger(__name__)


def find_sentence(runs: list[str | Path], task: str | None, index: int, min_images: int) -> tuple[str, np.ndarray]:
    """(task, tokens) of the index-th sentence of `task` (any task if None) with at least `min_images` images."""
    seen = 0
    for _, sentence_task, tokens in iter_sentences(runs):
        if (task is None or sentence_task == task) and len(tokens) >= min_images * TOKENS_PER_IMAGE:
            if seen == index:
                return sentence_task, tokens
            seen += 1
    raise ValueError(f"--task {task}: found {seen} sentence(s) with >= {min_images} images, need index {index}")


def prompt_positions(num_context: int, num_generate: int) -> int:
    """Positions the model sees: [BOS] + the context images + every generated token but the last,
    which is sampled and never fed back: (num_context + num_generate) x 256."""
    return 1 + num_context * TOKENS_PER_IMAGE + num_generate * TOKENS_PER_IMAGE - 1


def generate_images(model: LLaMA, context: np.ndarray, num_images: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """context: visual ids of whole images -> (num_images, 256) sampled visual ids."""
    device = next(model.parameters()).device
    prompt = torch.tensor(np.concatenate([[BOS_ID], context]), dtype=torch.long, device=device)[None]
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = model.generate(prompt, num_images * TOKENS_PER_IMAGE, temperature, top_k, top_p,
                         allowed=NUM_VISUAL_TOKENS, generator=generator)
    return ids[0].cpu().numpy().reshape(num_images, TOKENS_PER_IMAGE)


def run_decoder(runs: list[str | Path], config: str | None = None, weights: str | None = None) -> Any:
    """The tokenizer that made the first run's shards, or the one `config`/`weights` name (on CPU)."""
    run = next(iter(discover_runs(runs, include_incomplete=True, field_name="--data")), None)
    if config is None and weights is None:
        if run is None:
            raise ValueError(f"no UVD run under {[str(r) for r in runs]}")
        return load_run_tokenizer(run)
    seed = int(recipe_tokenizer_section(run).get("seed", 0) or 0) if run is not None else 0
    return get_tokenizer_stage()(config if weights is None else None, weights=weights, device="cpu", seed=seed)


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: str | Path, size: int = 128,
                  title: str | None = None) -> Path:
    """One labelled row per entry, images resized to `size`, under an optional title band; written as PNG."""
    pad, label_w, line_h = 4, 110, 14
    cols = max(len(images) for _, images in rows)
    width = label_w + cols * (size + pad) + pad
    lines = textwrap.wrap(title, max(20, (width - 2 * pad) // 6)) if title else []  # PIL's default font: ~6 px a character
    top = len(lines) * line_h + (2 * pad if lines else 0)
    sheet = Image.new("RGB", (width, top + len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, fill="black")
    for r, (label, images) in enumerate(rows):
        y = top + pad + r * (size + pad)
        draw.text((pad, y + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (label_w + pad + c * (size + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def sheet_title(mode: str, task: str, model: LLaMA, model_path: str | Path | None, tokenizer_info: dict) -> str:
    """What a sheet shows: the prompt, the model (folder, size, training steps), the tokenizer."""
    params = sum(p.numel() for p in model.parameters())
    where, steps = "(in memory)", "?"
    if model_path is not None:
        from uvd.model.checkpoint import checkpoint_info, resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(model_path)
            where, steps = str(ckpt), f"{checkpoint_info(ckpt).get('step', '?')}"
        except (ValueError, OSError):
            where = str(model_path)
    trained = "trained" if tokenizer_info.get("trained") else "UNTRAINED: random weights"
    return (f"{mode} prompt, task {task} | model {where}: {params / 1e6:.2f}M parameters, {steps} training steps | "
            f"tokenizer {tokenizer_info.get('id', '?')} ({trained})")


def prompt(model: LLaMA, runs: list[str | Path], out: str | Path, mode: str = "analogy", task: str | None = None,
           index: int = 0, num_context: int | None = None, num_generate: int = 1, temperature: float = 1.0,
           top_k: int | None = 100, top_p: float | None = None, seed: int = 0,
           tokenizer_config: str | None = None, tokenizer_weights: str | None = None,
           model_path: str | Path | None = None) -> dict[str, Any]:
    """Build a prompt from a sentence, sample `num_generate` images, decode and write the contact sheet,
    titled with the task, the model (`model_path`: its folder and training steps) and the tokenizer.

    analogy: `num_context` (input, annotation) pairs (default 5) + the next input -> its annotation.
    sequential: the first `num_context` images (default 15) -> the next `num_generate` images.
    """
    if mode not in ("analogy", "sequential"):
        raise ValueError(f"--mode: {mode!r} is not one of analogy, sequential")
    if mode == "analogy":
        num_context = 2 * (num_context or 5) + 1
        num_generate = 1
    else:
        num_context = num_context or 15
    if prompt_positions(num_context, num_generate) > model.config.max_seq_len:
        raise ValueError(f"prompt of {num_context} + {num_generate} images needs "
                         f"{prompt_positions(num_context, num_generate)} positions, more than max_seq_len "
                         f"{model.config.max_seq_len}")
    found_task, tokens = find_sentence(runs, task, index, num_context)
    context = tokens[: num_context * TOKENS_PER_IMAGE]
    truth = tokens[num_context * TOKENS_PER_IMAGE : (num_context + num_generate) * TOKENS_PER_IMAGE]
    generated = generate_images(model, context, num_generate, temperature, top_k, top_p, seed)
    decoder = run_decoder(runs, tokenizer_config, tokenizer_weights)
    all_tokens = np.concatenate([context.reshape(-1, TOKENS_PER_IMAGE), generated, truth.reshape(-1, TOKENS_PER_IMAGE)])
    images = decoder.decode_tokens(all_tokens.astype(np.uint16))  # (N, H, W, 3)
    prompt_images = list(images[:num_context])
    rows = [("prompt", prompt_images), ("generated", list(images[num_context : num_context + num_generate]))]
    if len(truth):
        rows.append(("true", list(images[num_context + num_generate :])))
    title = sheet_title(mode, found_task, model, model_path, getattr(decoder, "info", {}))
    path = contact_sheet(rows, out, title=title)
    return {"path": str(path), "task": found_task, "mode": mode, "context_images": num_context,
            "generated_tokens": generated, "title": title}


@register_trainer_demo
def demo_lvm(runs: str | Path, out: str | Path, max_steps: int = 300, task: str | None = None) -> dict[str, Any]:
    """The demo's last step: train the tiny LVM on the demo shards under `runs` (a few minutes on
    2 CPU cores), then one analogy prompt (5 pairs + a query; category groups hold same-class
    pairs) written as `out/analogy.png`. Resumes if `out/lvm` already holds checkpoints."""
    from uvd.model.config import load_train_config
    from uvd.model.checkpoint import load_model
    from uvd.model.train import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train" / "tiny.yaml"
    out = Path(out)
    config = load_train_config(recipe, [f"data.runs=[{runs}]", f"train.out={out / 'lvm'}", f"train.max_steps={max_steps}",
                                        f"train.ckpt_every={max_steps}", "train.log_every=25"])
    summary = train(config)
    model = load_model(out / "lvm")
    result = prompt(model, [runs], out / "analogy.png", mode="analogy", task=task, num_context=5, temperature=1.0,
                    model_path=out / "lvm",
                    top_k=100)
    result["train"] = {k: summary[k] for k in ("step", "tokens", "token_shares")}
    result["final_loss"] = summary["history"][-1]["loss"] if summary["history"] else None
    return result
