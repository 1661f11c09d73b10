"""Training throughput and the input pipeline's share of the step.

1. Loader share: the data pipeline at the --loader-config's batch (default: the 300M recipe, 8 x
   4096 tokens per rank) feeding a stand-in step that sleeps for a realistic step time (by default
   the config's FLOPs per step at 40% MFU of an H100: a 300M step cannot run on a CPU in bench
   time), with the prefetch thread and without it. It prints the training thread's wait for
   batches as a share of the step time (goal < 2%).
2. Trainer: tokens/s, measured step time, loader share and MFU of `model.train.train` (shards ->
   prefetched packed loader -> AdamW, clipping, logging, checkpoints) against a plain reference
   loop of the same model in the same run (random tokens already on the device).

    python bench/train.py                                   # tiny trainer on CPU; 300M loader share
    python bench/train.py --config recipes/train/lvm_300m.yaml --steps 30   # on a GPU
    python bench/train.py --step-time 0.5 --loader-steps 40

Without --data it writes synthetic shards (random visual tokens, 16-image sentences) to a temp folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from uvd.model.config import TrainConfig, load_train_config  # noqa: E402
from uvd.model.data import PackedLoader, Prefetcher  # noqa: E402
from uvd.model.llama import LLaMA  # noqa: E402
from uvd.model.train import PEAK_TFLOPS, make_optimizer, peak_flops, train  # noqa: E402
from uvd.manifest import write_manifest  # noqa: E402
from uvd.shards import write_shard  # noqa: E402


def synthetic_run(root: Path, num_sentences: int = 64, seed: int = 0, num_shards: int = 1,
                  row_group_size: int = 64) -> Path:
    """Random 16-image sentences in `num_shards` listed shards of `row_group_size`-row groups."""
    rng = np.random.default_rng(seed)
    run = root / "synthetic"
    (run / "data").mkdir(parents=True)
    shards = {}
    for k in range(num_shards):
        count = len(range(k, num_sentences, num_shards))
        rows = [{"id": f"s{k}-{i}", "source": "synthetic", "task": "video_s10", "num_images": 16,
                 "tokens": rng.integers(0, 8192, 16 * 256).astype(np.uint16), "images": [""] * 16, "meta": "{}"}
                for i in range(count)]
        name = f"data/synthetic-000000-{k:03d}.parquet"
        write_shard(rows, run / name, row_group_size, "zstd", 3)
        counts = {"sentences": count, "images": 16 * count, "tokens": count * 16 * 256}
        shards[name] = {**counts, "by_task": {"video_s10": counts}}
    write_manifest(run, {"schema_version": 2, "source": "synthetic", "recipe_hash": "synthetic", "status": "complete",
                         "tokenizer": {}, "shards": shards})
    return run


@dataclass
class LoaderResult:
    prefetch: int
    wait_s: float  # mean time per step the training thread waited for its batches
    step_s: float  # mean wall time per step (stand-in compute + wait)


def loader_share(config: TrainConfig, data: str, step_time: float, steps: int, prefetch: int,
                 world_size: int = 1) -> LoaderResult:
    """Feed a stand-in step (sleep) from the packed loader, as the trainer does (grad_accum batches a
    step), as rank 0 of `world_size` (each rank packs the global batch and keeps its slice)."""
    tc = config.train
    loader = PackedLoader([data], config.data.seq_len, tc.batch_size, config.data.mixture,
                          config.data.shuffle_buffer, config.data.seed, rank=0, world_size=world_size)
    batches = Prefetcher(loader, prefetch) if prefetch else loader
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warmup = max(2, steps // 5)
    wait = 0.0
    try:
        for i in range(warmup + steps):
            if i == warmup:
                wait, start = 0.0, time.perf_counter()
            for _ in range(tc.grad_accum):
                t0 = time.perf_counter()
                x, y = batches.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                wait += time.perf_counter() - t0
            time.sleep(step_time)  # the stand-in for forward + backward + optimizer step
        total = time.perf_counter() - start
    finally:
        if prefetch:
            batches.close()
    return LoaderResult(prefetch, wait / steps, total / steps)


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
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--config", default=str(root / "recipes/train/tiny.yaml"), help="the trainer's config (part 2)")
    parser.add_argument("--loader-config", default=str(root / "recipes/train/lvm_300m.yaml"),
                        help="the config whose batch the loader builds (part 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", help="run folder(s) root; default: synthetic shards")
    parser.add_argument("--steps", type=int, default=20, help="measured trainer steps (after as many warm-up steps / 4)")
    parser.add_argument("--loader-steps", type=int, default=30, help="measured stand-in steps")
    parser.add_argument("--step-time", type=float, default=None,
                        help="stand-in step seconds; default: the loader config's FLOPs per step at 40%% MFU of an H100")
    parser.add_argument("--sentences", type=int, default=6144, help="synthetic 16-image sentences (4096 tokens each)")
    parser.add_argument("--world-sizes", default="1,8", help="loader as rank 0 of these numbers of ranks")
    parser.add_argument("--moe", type=int, default=0, metavar="E",
                        help="also the same model with E experts per MoE layer at equal active parameters "
                             "(expert width ffn_dim / top_k), side by side with the dense one")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synthetic_run(Path(tmp) / "data", args.sentences if not args.skip_loader else 256,
                                              num_shards=4, row_group_size=256))
        if not args.skip_loader:
            loader_report(args, data)
        if not args.skip_trainer:
            variants = [("dense", [])] + ([("moe", [f"model.moe_experts={args.moe}"])] if args.moe else [])
            results = {}
            for label, extra in variants:
                results[label] = trainer_report(argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *extra]}),
                                                data, f"{tmp}/{label}")
            if len(results) == 2:
                (dt, dm), (mt, mm) = results["dense"], results["moe"]
                print(f"dense vs MoE at equal active parameters: {dt:,.0f} vs {mt:,.0f} tokens/s ({mt / dt:.2f}x); "
                      f"MFU {dm} vs {mm}")


def loader_report(args: argparse.Namespace, data: str) -> None:
    """1. The loader's share of a realistic step."""
    lconfig = load_train_config(args.loader_config, [f"data.runs=[{data}]"])
    flops_per_step = _flops_per_token(lconfig) * lconfig.train.batch_size * lconfig.train.grad_accum * lconfig.data.seq_len
    step_time = args.step_time or flops_per_step / (PEAK_TFLOPS["H100"] * 1e12 * 0.4)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"loader: {Path(args.loader_config).name} batch, {lconfig.train.batch_size} x {lconfig.data.seq_len} "
          f"tokens x accum {lconfig.train.grad_accum} per rank; stand-in step {step_time * 1000:.0f} ms "
          f"({'given' if args.step_time else 'FLOPs per step at 40% MFU of an H100'}; a sleep, not a real "
          f"step: the model does not run); batches on {device_name}, {args.loader_steps} measured steps")
    for world_size in map(int, args.world_sizes.split(",")):
        for prefetch in (lconfig.data.prefetch or 4, 0):
            r = loader_share(lconfig, data, step_time, args.loader_steps, prefetch, world_size)
            label = f"{world_size} rank(s), " + (f"prefetch {prefetch}" if prefetch else "inline")
            print(f"  {label:24s} loader wait {r.wait_s * 1000:8.2f} ms/step = {r.wait_s / r.step_s:6.2%} of the "
                  f"step ({r.step_s * 1000:.0f} ms)")


def trainer_report(args: argparse.Namespace, data: str, tmp: str) -> tuple[float, str]:
    """2. The trainer against a plain loop: tokens/s, step time, loader share, MFU."""
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
    windows = [r for r in summary["history"] if "tokens_per_s" in r][1:]  # skip warm-up
    ours = float(np.mean([r["tokens_per_s"] for r in windows]))
    share = float(np.mean([r["loader_share"] for r in windows]))
    step_s = float(np.mean([r["step_time_s"] for r in windows]))
    ref_after = reference_loop(config, device, warmup, args.steps)
    ref = (ref_before + ref_after) / 2

    model = LLaMA(config.model)
    flops = model.flops_per_token(config.data.seq_len)
    peak = peak_flops(config.train.peak_tflops, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    moe = f", MoE {config.model.moe_experts} experts top-{config.model.moe_top_k}" if config.model.moe_experts else ""
    print(f"trainer: model {config.size}{moe} ({model.num_params() / 1e6:.2f}M params, "
          f"{model.num_params(active=True) / 1e6:.2f}M active), seq_len {config.data.seq_len}, batch "
          f"{config.train.batch_size} x accum {config.train.grad_accum}, {name}, {args.steps} measured steps")
    for label, tps in (("uvd trainer", ours), ("plain loop", ref)):
        mfu = f"{tps * flops / peak:.1%}" if peak else \
            f"n/a ({tps * flops / 1e9:.1f} GFLOP/s; no peak known for this device: --set train.peak_tflops=X)"
        print(f"  {label:12s} {tps:12,.0f} tokens/s   MFU {mfu}")
    print(f"  trainer step {step_s * 1000:.1f} ms, loader wait {share:.2%} of it")
    print(f"  ratio trainer / plain loop: {ours / ref:.2f}   (plain loop before {ref_before:,.0f}, after {ref_after:,.0f} tokens/s)")
    return ours, (f"{ours * flops / peak:.1%}" if peak else "n/a")


def _flops_per_token(config: TrainConfig) -> float:
    """LLaMA.flops_per_token without building the model: 6 N (no embeddings) + attention."""
    c = config.model
    per_layer = 4 * c.dim * c.dim * (1 + c.num_kv_heads / c.num_heads) / 2 + 3 * c.dim * c.ffn_dim + 2 * c.dim
    n = c.num_layers * per_layer + c.dim + c.vocab_size * c.dim  # blocks, final norm, lm_head
    return 6 * n + 12 * c.num_layers * c.dim * config.data.seq_len


if __name__ == "__main__":
    main()
