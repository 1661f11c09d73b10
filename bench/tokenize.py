"""Throughput of the tokenize stage: images/s of the VQGAN encoder for a batch-size sweep, fp32 vs bf16,
on CPU and (when one is available) on a GPU; ratios against batch 1 fp32 on the same device.

    python bench/tokenize.py                          # CPU: 'small' preset; GPU: 'lvm' preset
    python bench/tokenize.py --config lvm --batch-sizes 1,8,32,64 --seconds 5
    python bench/tokenize.py --ray                    # also the whole Ray stage (map_batches actor)

On a GPU it also prints the share of the bf16 matmul peak (measured here with a large matmul) that
the encoder's FLOPs (counted from the conv shapes; ~216 GFLOPs/image for 'lvm') achieve, and the
encode-only rate against the whole-stage rate (uint8 host batch in, uint16 tokens out, and through Ray).
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/tokenize.py`, this folder is sys.path[0] and this file would shadow the standard
# library's `tokenize` (imported by linecache, inspect, ...): take the folder off the path first.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uvd.tokenizer.encode import ImageTokenizer  # noqa: E402
from uvd.tokenizer.vqgan import VQGAN, resolve_config  # noqa: E402


def encoder_flops(config: str, size: int = 256) -> float:
    """FLOPs (2 x MACs) of encode() for one image, from the conv and codebook shapes (meta device, no compute)."""
    cfg = resolve_config(config)
    with torch.device("meta"):
        model = VQGAN(cfg)
    total = [0.0]

    def hook(module: nn.Conv2d, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total[0] += 2.0 * k * output.numel()

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        z = model.encode_latents(torch.empty(1, 3, size, size))
    total[0] += 2.0 * z.shape[2] * z.shape[3] * cfg.z_channels * cfg.num_embeddings  # distances to every code
    return total[0]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak to compare the encoder with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, batch: int, seconds: float, device: torch.device) -> float:
    fn()  # warm-up (cuDNN autotune, oneDNN primitive cache)
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        fn()
        count += 1
    _sync(device)
    return batch * count / (time.perf_counter() - start)


def gpu_utilization_during(fn, seconds: float) -> float | None:
    """Mean GPU utilization (%) sampled while `fn` runs repeatedly; None without NVML."""
    try:
        torch.cuda.utilization()
    except (ImportError, RuntimeError, ModuleNotFoundError):
        return None
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        samples.append(torch.cuda.utilization())
    return float(np.mean(samples)) if samples else None


def ray_stage_rate(config: str, device: str, dtype: str, batch: int, num_images: int) -> float:
    """Images/s through Ray Data: a pixel-making read stage -> the ImageTokenizer actor (map_batches)."""
    import ray

    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    size = resolve_config(config).resolution

    def make_pixels(rows: dict) -> dict:
        n = len(rows["id"])
        rng = np.random.default_rng(int(rows["id"][0]))
        return {"pixels": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "key": rows["id"].astype(str)}

    ds = ray.data.range(num_images).map_batches(make_pixels, batch_size=batch)
    ds = ds.map_batches(ImageTokenizer, fn_constructor_kwargs={"config": config, "device": device, "dtype": dtype},
                        batch_size=batch, concurrency=1, num_gpus=1 if device == "cuda" else 0)
    start = time.perf_counter()
    rows = sum(len(b["tokens"]) for b in ds.iter_batches(batch_size=batch))
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="tokenizer preset (default: lvm on GPU, small on CPU)")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 1,4,16 on CPU; 1,8,32,64,128 on GPU)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--devices", help="comma-separated: cpu,cuda (default: cpu, plus cuda when available)")
    parser.add_argument("--ray", action="store_true", help="also measure the whole stage through Ray Data")
    parser.add_argument("--ray-images", type=int, default=512)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device_name in devices:
        device = torch.device(device_name)
        config = args.config or ("lvm" if device.type == "cuda" else "small")
        sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,64,128" if device.type == "cuda" else "1,4,16")).split(",")]
        flops = encoder_flops(config)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
        print(f"\n== {name}: config {config}, encoder {flops / 1e9:.1f} GFLOPs/image"
              + (f", measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
        baseline = None
        for dtype in args.dtypes.split(","):
            tok = ImageTokenizer(config, device=device_name, dtype=dtype)
            for batch in sizes:
                pixels = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
                x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)

                def encode_only() -> None:
                    with torch.inference_mode(), tok._autocast():
                        tok.model.encode(x)

                def whole_stage() -> None:
                    tok({"pixels": pixels, "reject": np.array([""] * batch, dtype=object)})

                enc = rate(encode_only, batch, args.seconds, device)
                stage = rate(whole_stage, batch, args.seconds, device)
                baseline = baseline or enc
                row = {"device": name, "config": config, "dtype": dtype, "batch": batch, "encode_img_s": enc,
                       "stage_img_s": stage, "vs_batch1_fp32": enc / baseline}
                line = (f"{dtype:>9} batch {batch:>4}: encode {enc:9.1f} img/s  stage {stage:9.1f} img/s "
                        f"({stage / enc:6.1%} of encode)  x{enc / baseline:5.2f} vs batch-1 fp32")
                if peak:
                    row["share_of_bf16_peak"] = enc * flops / peak
                    line += f"  {enc * flops / 1e12:6.1f} TFLOP/s = {enc * flops / peak:5.1%} of bf16 peak"
                    util = gpu_utilization_during(whole_stage, min(args.seconds, 2.0))
                    if util is not None:
                        row["gpu_util_stage"] = util
                        line += f"  GPU util (stage) {util:.0f}%"
                print(line, flush=True)
                results.append(row)
        if args.ray:
            best = max((r for r in results if r["device"] == name), key=lambda r: r["encode_img_s"])
            ray_rate = ray_stage_rate(config, device_name, best["dtype"], best["batch"], args.ray_images)
            print(f"Ray stage ({best['dtype']}, batch {best['batch']}): {ray_rate:.1f} img/s = "
                  f"{ray_rate / best['encode_img_s']:.1%} of the encode-only rate")
            results.append({"device": name, "config": config, "ray_stage_img_s": ray_rate, "dtype": best["dtype"],
                            "batch": best["batch"], "vs_encode_only": ray_rate / best["encode_img_s"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
