"""The data loader, trainer, evaluation and prompting on small synthetic shards (seeded)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import BOS_ID, EOS_ID, train_config_from_dict
from model.data import PackedLoader, find_components
from model.evaluate import ablation_variants, evaluate, format_results
from model.llama import LLaMA
from model.train import latest_checkpoint, load_model, lr_at, train
from uvd.manifest import write_manifest
from uvd.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


def image_tokens(rng: np.random.Generator, num_images: int) -> np.ndarray:
    """Learnable images: each a run of consecutive ids from a random start, within 64 ids."""
    starts = rng.integers(0, 64, size=num_images)
    return np.concatenate([(s + np.arange(256)) % 64 for s in starts]).astype(np.uint16)


def write_run(run_dir: Path, source: str, tasks: dict[str, tuple[int, int]], num_shards: int, seed: int) -> None:
    """tasks: task -> (sentences, images per sentence), spread over num_shards listed shards."""
    rng = np.random.default_rng(seed)
    rows = [
        {"id": f"{source}-{task}-{i}", "source": source, "task": task, "num_images": num_images,
         "tokens": image_tokens(rng, num_images), "images": [f"img{j}" for j in range(num_images)], "meta": "{}"}
        for task, (count, num_images) in tasks.items()
        for i in range(count)
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    run_dir.mkdir(parents=True)
    shards = {}
    for k in range(num_shards):
        part = rows[k::num_shards]
        name = f"{source}-{k:05d}.parquet"
        write_shard(part, run_dir / name, 64, "zstd", 3)
        by_task = {}
        for r in part:
            t = by_task.setdefault(r["task"], {"sentences": 0, "images": 0, "tokens": 0})
            t["sentences"] += 1
            t["images"] += r["num_images"]
            t["tokens"] += len(r["tokens"])
        shards[name] = {"sentences": len(part), "images": sum(t["images"] for t in by_task.values()),
                        "tokens": sum(t["tokens"] for t in by_task.values()), "by_task": by_task}
    # An unlisted (unfinished) shard that must never be read.
    write_shard(rows[:1], run_dir / f"{source}-{num_shards:05d}.parquet", 64, "zstd", 3)
    (run_dir / f"{source}-{num_shards:05d}.parquet").write_bytes(b"not parquet")
    write_manifest(run_dir, {"schema_version": 1, "source": source, "status": "complete", "shards": shards,
                             "tokenizer": {}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Short sentences: a training mix of three sources and four tasks."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "laion", "laion", {"single": (120, 1)}, 3, 0)
    write_run(root / "imagenet_groups", "imagenet_groups", {"category_k2": (40, 2)}, 2, 1)
    write_run(root / "video", "video", {"video_s10": (20, 2), "video_s20": (20, 1)}, 2, 2)
    return root


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory) -> Path:
    """Long sentences for the LVM protocol: annotated pairs (12 images) and videos (16 frames)."""
    root = tmp_path_factory.mktemp("eval_runs")
    write_run(root / "annotated", "annotated", {"colorization": (3, 12), "single": (2, 1)}, 1, 3)
    write_run(root / "video", "video", {"video_s10": (2, 16)}, 1, 4)
    return root


def config(runs: Path, out: Path, **sections) -> "TrainConfig":  # noqa: F821
    data = {
        "model": {"size": "tiny", "max_seq_len": 4096},
        "data": {"runs": [str(runs)], "seq_len": 256, "shuffle_buffer": 16, "seed": 0},
        "optim": {"lr": 3e-3, "end_lr": 3e-4, "warmup_steps": 5},
        "train": {"out": str(out), "batch_size": 4, "max_steps": 6, "device": "cpu", "dtype": "float32",
                  "log_every": 2, "ckpt_every": 3},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return train_config_from_dict(data)


def test_windows_are_packed_sentences(runs):
    loader = PackedLoader([runs], seq_len=300, batch_size=2, shuffle_buffer=8, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 300) and torch.equal(x[:, 1:], y[:, :-1])
    assert x[0, 0] == BOS_ID  # the first window starts a sentence
    stream = torch.cat([x[0], y[0, -1:], x[1, 1:], y[1, -1:]])  # consecutive windows overlap by one token
    assert torch.equal(x[1, 0], y[0, -1])
    bos = (stream == BOS_ID).nonzero().flatten().tolist()
    eos = (stream == EOS_ID).nonzero().flatten().tolist()
    for b, e in zip(bos, eos):  # [BOS] k*256 visual ids [EOS]
        assert e > b and (e - b - 1) % 256 == 0 and int(stream[b + 1 : e].max()) < 8192


def test_loader_is_deterministic_and_rank_sharded(runs):
    a = [PackedLoader([runs], 256, 2, seed=1, shuffle_buffer=8).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    c = PackedLoader([runs], 256, 2, seed=2, shuffle_buffer=8).next_batch()[0]
    assert not torch.equal(a[0], c)
    r0 = PackedLoader([runs], 256, 2, seed=1, shuffle_buffer=8, rank=0, world_size=2)
    r1 = PackedLoader([runs], 256, 2, seed=1, shuffle_buffer=8, rank=1, world_size=2)
    seen0 = {tuple(w.tolist()) for _ in range(20) for w in r0.next_batch()[0]}
    seen1 = {tuple(w.tolist()) for _ in range(20) for w in r1.next_batch()[0]}
    assert not seen0 & seen1


@pytest.mark.parametrize("mixture", [
    {},
    {"laion": 0.5, "imagenet_groups": 0.3, "video": 0.2},
    {"laion": 0.0, "imagenet_groups": 1.0, "video/video_s10": 2.0, "video/video_s20": 1.0},
])
def test_realized_token_shares_match_the_weights(runs, mixture):
    loader = PackedLoader([runs], 512, 4, mixture=mixture, shuffle_buffer=8, seed=0)
    for _ in range(100):
        loader.next_batch()
    weights = {c.key: c.weight for c in loader.components}
    shares = loader.token_shares()
    assert set(shares) == set(weights) and abs(sum(weights.values()) - 1) < 1e-9
    for key, weight in weights.items():
        assert abs(shares[key] - weight) < 0.01, (key, shares[key], weight)
    if mixture.get("laion") == 0.0:
        assert "laion" not in shares
        assert weights["video/video_s10"] == pytest.approx(0.5)
    if not mixture:  # natural shares: tokens + BOS/EOS of each source
        natural = {"laion": 120 * 258, "imagenet_groups": 40 * 514, "video": 20 * 514 + 20 * 258}
        total = sum(natural.values())
        assert weights == pytest.approx({k: v / total for k, v in natural.items()})


def test_mixture_errors_name_the_component(runs):
    with pytest.raises(ValueError, match="data.mixture.objaverse"):
        find_components([runs], {"objaverse": 1.0})
    with pytest.raises(ValueError, match="data.mixture.video/video_s99"):
        find_components([runs], {"video/video_s99": 1.0})
    with pytest.raises(ValueError, match="weight 0"):
        find_components([runs], {"laion": 0, "imagenet_groups": 0, "video": 0})


def test_loader_resumes_at_the_exact_window(runs):
    mixture = {"laion": 1.0, "video": 1.0, "imagenet_groups": 0.5}
    a = PackedLoader([runs], 256, 3, mixture=mixture, shuffle_buffer=16, seed=0)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON
    expected = [a.next_batch()[0] for _ in range(40)]  # crosses shard and epoch boundaries
    b = PackedLoader([runs], 256, 3, mixture=mixture, shuffle_buffer=16, seed=0)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(b.next_batch()[0], want)


def test_lr_schedule():
    from model.config import OptimOptions

    optim = OptimOptions(lr=1.0, end_lr=0.1, warmup_steps=10)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.55)
    assert lr_at(110, optim, 110) == pytest.approx(0.1)


def test_loss_decreases(runs, tmp_path):
    cfg = config(runs, tmp_path / "t", train={"max_steps": 25, "ckpt_every": 25, "log_every": 5})
    history = train(cfg)["history"]
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert first > 8.5 and last < first - 2.0, (first, last)
    assert all("tokens_per_s" in h for h in history if h["step"] % 5 == 0)


def test_resume_gives_the_same_batches_and_losses(runs, tmp_path):
    mix = {"mixture": {"laion": 2.0, "video": 1.0}}
    straight = train(config(runs, tmp_path / "a", data=mix, train={"grad_accum": 2}))
    train(config(runs, tmp_path / "b", data=mix, train={"grad_accum": 2}), stop_after=3)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_0000003"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    # The saved data position gives the batch an uninterrupted loader gives after 3 steps x 2 micro-batches.
    fresh = PackedLoader([runs], 256, 4, mixture=mix["mixture"], shuffle_buffer=16, seed=0)
    for _ in range(6):
        fresh.next_batch()
    resumed = PackedLoader([runs], 256, 4, mixture=mix["mixture"], shuffle_buffer=16, seed=0)
    resumed.load_state_dict(json.loads((ckpt / "data_rank0.json").read_text()))
    assert torch.equal(resumed.next_batch()[0], fresh.next_batch()[0])
    rest = train(config(runs, tmp_path / "b", data=mix, train={"grad_accum": 2}))
    assert [h["step"] for h in rest["history"]] == [4, 5, 6]
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in straight["history"][3:]]
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert rest["token_shares"] == pytest.approx(straight["token_shares"])


def test_eval_protocol_on_a_tiny_model(eval_runs):
    torch.manual_seed(0)
    model = LLaMA(config(eval_runs, Path("unused")).model)
    results = evaluate(model, [eval_runs], max_prompts_per_task=2, num_windows=2, batch_size=2, seq_len=512)
    assert set(results["tasks"]) == {"colorization", "video_s10"}  # single images are not prompt-evaluated
    assert results["tasks"]["colorization"]["kind"] == "pairs" and results["tasks"]["video_s10"]["kind"] == "video"
    assert results["tasks"]["colorization"]["prompts"] == 2
    for r in [*results["tasks"].values(), results["heldout"]]:
        assert 1000 < r["perplexity"] < 3 * 8292  # an untrained model is near uniform
    table = format_results({"all": results, "no_laion": results})
    assert "colorization" in table and "no_laion" in table


def test_ablation_variants_leave_one_component_out(runs, tmp_path):
    cfg = config(runs, tmp_path / "abl", data={"mixture": {"video/video_s10": 2.0}})
    variants = ablation_variants(cfg, ["video", "laion"])
    assert list(variants) == ["all", "no_video", "no_laion"]
    assert variants["no_video"].data.mixture == {"video": 0.0}
    assert variants["no_laion"].data.mixture == {"video/video_s10": 2.0, "laion": 0.0}
    assert len({v.train.out for v in variants.values()}) == 3
    keys = {c.key for c in find_components([runs], variants["no_video"].data.mixture)}
    assert keys == {"laion", "imagenet_groups"}


def test_cli_train_eval_prompt(runs, eval_runs, tmp_path):
    import tokenizer  # noqa: F401  (registers the tokenizer stage that decodes)
    from uvd.cli import main

    out = tmp_path / "cli"
    assert main(["train", str(ROOT / "recipes/train/tiny.yaml"), "--set", f"data.runs=[{runs}]",
                 "--set", f"train.out={out}", "--set", "train.max_steps=4", "--set", "data.seq_len=256",
                 "--set", "train.log_every=2"]) == 0
    assert (out / "config.yaml").is_file() and latest_checkpoint(out).name == "step_0000004"
    assert main(["eval", str(out), "--data", str(eval_runs), "--max-prompts", "1", "--windows", "1",
                 "--device", "cpu", "--json"]) == 0
    sheet = tmp_path / "sheet.png"
    assert main(["prompt", str(out), "--data", str(eval_runs), "--mode", "analogy", "--task", "colorization",
                 "--context", "2", "--tokenizer-config", "test", "--out", str(sheet), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 5 * 128
    assert main(["train", str(ROOT / "recipes/train/tiny.yaml"), "--set", "data.mixture={nope: 1}",
                 "--set", f"data.runs=[{runs}]"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_cpu_ddp(runs, tmp_path, parallel):
    out = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "uvd.cli", "train", str(ROOT / "recipes/train/tiny.yaml"),
           "--set", f"data.runs=[{runs}]", "--set", f"train.out={out}", "--set", "train.max_steps=4",
           "--set", "data.seq_len=256", "--set", "train.batch_size=2", "--set", "train.ckpt_every=2",
           "--set", f"train.parallel={parallel}", "--set", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000004"
    states = [json.loads((ckpt / f"data_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["world_size"] == 2 and states[0]["streams"] != states[1]["streams"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["tokens"] == 4 * 2 * 2 * 256  # steps x batch x ranks x seq_len
    load_model(out)  # the full weights were gathered
    if parallel == "fsdp":  # resume: sharded model and optimizer state from the full checkpoint
        cmd[cmd.index("train.max_steps=4")] = "train.max_steps=6"
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "resumed from" in proc.stderr + proc.stdout
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and np.isfinite(log[-1]["loss"])
