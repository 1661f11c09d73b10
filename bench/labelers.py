"""Benchmark: images/s per labeler (CPU, or the GPU when torch sees one), on random-weight models of
small test configs and of the real architectures' sizes, and the read+decode Ray stage's images/s
with and without a labeler actor pool after it, same inputs, same run.

    .venv/bin/python bench/labelers.py [--images 16] [--real] [--cpus N]

Real-size configs (random weights; speed does not depend on the values): Depth Anything V2 small
(ViT-S/14 at 518), SegFormer-B0 at 512, HED (ControlNet's) at 256, normals from that depth model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

import numpy as np  # noqa: E402

import uvd.pipelines  # noqa: E402,F401
from uvd.pipelines.labelers import LabelerStage, build_labeler  # noqa: E402
from uvd.pipelines.labelers.edges import _hed_network  # noqa: E402


def save_models(root: Path, real: bool) -> dict[str, dict]:
    """Random-weight model folders, saved as the libraries save them -> {label: labeler spec}."""
    import torch
    from transformers import (AutoModelForDepthEstimation, AutoModelForSemanticSegmentation, DepthAnythingConfig, Dinov2Config,
                              SegformerConfig)

    torch.manual_seed(0)
    specs = {"edges canny": {"name": "edges", "kind": "edges"}}
    if real:
        dinov2 = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
                              image_size=518, out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False)
        depth = DepthAnythingConfig(backbone_config=dinov2, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, reassemble_hidden_size=384)
        segformer = SegformerConfig(num_labels=150)  # B0: hidden sizes 32..256, decoder 256
        depth_size, seg_size, label = 518, 512, "real size"
    else:
        dinov2 = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=70,
                              out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
        depth = DepthAnythingConfig(backbone_config=dinov2, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32,
                                    head_hidden_size=8)
        segformer = SegformerConfig(num_labels=150, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
                                    strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16)
        depth_size, seg_size, label = 70, 64, "small"
    AutoModelForDepthEstimation.from_config(depth).save_pretrained(root / "depth")
    AutoModelForSemanticSegmentation.from_config(segformer).save_pretrained(root / "segmentation")
    specs[f"depth ({label}, {depth_size}px)"] = {"name": "depth", "kind": "depth", "weights": str(root / "depth"), "options": {"input_size": depth_size}}
    specs[f"normals from depth ({label})"] = {"name": "normals", "kind": "normals",
                                              "options": {"depth_weights": str(root / "depth"), "input_size": depth_size}}
    specs[f"segmentation ({label}, {seg_size}px)"] = {"name": "segmentation", "kind": "segmentation", "weights": str(root / "segmentation"),
                                                      "options": {"input_size": seg_size}}
    if real:
        torch.save(_hed_network().state_dict(), root / "ControlNetHED.pth")
        specs["edges HED (256px)"] = {"name": "edges", "kind": "edges", "weights": str(root / "ControlNetHED.pth"), "options": {"method": "hed"}}
    return specs


def per_labeler(specs: dict[str, dict], pixels: np.ndarray, batch_size: int, repeats: int) -> None:
    for label, spec in specs.items():
        labeler = build_labeler({**spec, "batch_size": batch_size})
        labeler(pixels[:batch_size])  # warm up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            labeler(pixels)
            rates.append(len(pixels) / (time.perf_counter() - start))
        runs = ", ".join(f"{r:.1f}" for r in rates)
        print(f"  {label:40s} {statistics.median(rates):8.1f} images/s   ({labeler.device}, {labeler.dtype_name}, batch {batch_size}; runs {runs})")


def job_stage(spec: dict, num_cpus: int, num_photos: int) -> None:
    """The whole job (`run_recipe`: read, decode, tokenize, assemble, write) on the same photos,
    without and with the labeler, alternated (medians of 3): input images per second."""
    from bench.common import local_ray
    from uvd.demo.world_annotated import build_photo_folder
    from uvd.recipe import recipe_from_dict
    from uvd.runner import run_recipe

    with tempfile.TemporaryDirectory() as tmp:
        world = build_photo_folder(Path(tmp) / "photos", num_images=num_photos, seed=0)
        base = {"source": "derived_pairs", "inputs": world["path"], "tokenizer": {"config": "test", "batch_size": 16},
                "limits": {"max_reject_rate": 1.0}}
        rates: dict[bool, list[float]] = {False: [], True: []}
        with local_ray(num_cpus):
            for i in range(4):  # the first round warms up (imports, actor start-up); not counted
                for labeled in (False, True):
                    data = {**base, "labelers": {"models": [spec]}} if labeled else base
                    summary = run_recipe(recipe_from_dict(data), Path(tmp) / f"run-{labeled}-{i}", progress=False)
                    if i:
                        rates[labeled].append(num_photos / summary.seconds)
        print(f"  whole job, no labeler        : {statistics.median(rates[False]):8.1f} input images/s ({num_photos} photos, "
              "derived_pairs, test tokenizer)")
        print(f"  whole job + {spec['name']:16s} : {statistics.median(rates[True]):8.1f} input images/s "
              "(one labeler actor pool; same inputs, same process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--real", action="store_true", help="also the real-size architectures (slow on CPU)")
    parser.add_argument("--real-images", type=int, default=4, help="images per run for the real-size models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--photos", type=int, default=400, help="photos for the Ray stage comparison (3 images each)")
    parser.add_argument("--no-job", action="store_true", help="skip the Ray stage comparison")
    args = parser.parse_args()
    import torch

    rng = np.random.default_rng(0)
    pixels = np.ascontiguousarray(rng.integers(0, 256, (args.images, 32, 32, 3)).astype(np.uint8).repeat(8, 1).repeat(8, 2))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, GPU: {torch.cuda.is_available()}; {args.images} images 256x256")
    with tempfile.TemporaryDirectory() as tmp:
        for real in [False, True] if args.real else [False]:
            folder = Path(tmp) / ("real" if real else "small")
            specs = save_models(folder, real)
            print("real-size architectures:" if real else "small test configs:")
            per_labeler(specs, pixels if not real else pixels[: args.real_images], args.batch_size, args.repeats)
        if not args.no_job:
            print("whole read stage, with and without a labeler (Canny):")
            job_stage({"name": "edges", "kind": "edges"}, args.cpus, args.photos)


if __name__ == "__main__":
    main()
