"""Training throughput: tokens/s and MFU of `model.train.train` (shards -> packed loader -> AdamW,
clipping, logging, checkpoints) against a plain reference loop of the same model in the same run
(random tokens already on the device, forward, backward, AdamW step).

    python bench/train.py                                   # tiny model on CPU, synthetic shards
    python bench/train.py --config recipes/train/lvm_300m.yaml --steps 30 --set train.batch_size=8

Without --data it writes synthetic shards (random visual tokens, 16-image sentences) to a temp folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

from model.config import load_train_config  # noqa: E402
from model.llama import LLaMA  # noqa: E402
from model.train import make_optimizer, peak_flops, train  # noqa: E402
from uvd.manifest import write_manifest  # noqa: E402
from uvd.shards import write_shard  # noqa: E402


def synthetic_run(root: Path, num_sentences: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [{"id": f"s{i}", "source": "synthetic", "task": "video_s10", "num_images": 16,
             "tokens": rng.integers(0, 8192, 16 * 256).astype(np.uint16), "images": [""] * 16, "meta": "{}"}
            for i in range(num_sentences)]
    run = root / "synthetic"
    run.mkdir(parents=True)
    write_shard(rows, run / "synthetic-00000.parquet", 64, "zstd", 3)
    tokens = num_sentences * 16 * 256
    counts = {"sentences": num_sentences, "images": 16 * num_sentences, "tokens": tokens}
    write_manifest(run, {"schema_version": 1, "source": "synthetic", "status": "complete", "tokenizer": {},
                         "shards": {"synthetic-00000.parquet": {**counts, "by_task": {"video_s10": counts}}}})
    return run


def reference_loop(config, device: torch.device, warmup: int, steps: int) -> float:
    """tokens/s of a bare loop: same model, batch, autocast and optimizer; no data loading, no clipping."""
    tc = config.train
    torch.manual_seed(0)
    model = LLaMA(config.model).to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    forward = torch.compile(model) if tc.compile else model
    optimizer = make_optimizer(model, config.optim, device)
    x = torch.randint(0, 8192, (tc.batch_size, config.data.seq_len), device=device)
    use_bf16 = device.type == "cuda" and tc.dtype == "bfloat16"
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
        for _ in range(tc.grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                _, loss = forward(x, x)
            (loss / tc.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * tc.grad_accum * tc.batch_size * config.data.seq_len / (time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "recipes/train/tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", help="run folder(s) root; default: synthetic shards")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after as many warm-up steps / 4)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synthetic_run(Path(tmp) / "data"))
        warmup = max(2, args.steps // 4)
        overrides = [f"data.runs=[{data}]", f"train.out={tmp}/out", f"train.max_steps={warmup + args.steps}",
                     f"train.log_every={warmup}", f"train.ckpt_every={10 ** 9}", *args.overrides]
        config = load_train_config(args.config, overrides)
        if args.steps % warmup:
            raise SystemExit(f"--steps must be a multiple of {warmup}")
        device = torch.device("cuda" if config.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        # The plain loop runs before and after the trainer: on a shared machine the spread shows the noise.
        ref_before = reference_loop(config, device, warmup, args.steps)
        summary = train(config)
        windows = [r["tokens_per_s"] for r in summary["history"] if "tokens_per_s" in r][1:]  # skip warm-up
        ours = float(np.mean(windows))
        ref_after = reference_loop(config, device, warmup, args.steps)
        ref = (ref_before + ref_after) / 2

    model = LLaMA(config.model)
    flops = model.flops_per_token(config.data.seq_len)
    peak = peak_flops(config.train.peak_tflops, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {config.size} ({model.num_params() / 1e6:.1f}M params), seq_len {config.data.seq_len}, "
          f"batch {config.train.batch_size} x accum {config.train.grad_accum}, {name}, {args.steps} measured steps")
    for label, tps in (("uvd trainer", ours), ("plain loop", ref)):
        mfu = f"{tps * flops / peak:.1%}" if peak else f"{tps * flops / 1e9:.1f} GFLOP/s (no peak known)"
        print(f"  {label:12s} {tps:12,.0f} tokens/s   MFU {mfu}")
    print(f"  ratio trainer / plain loop: {ours / ref:.2f}   (plain loop before {ref_before:,.0f}, after {ref_after:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
