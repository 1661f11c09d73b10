"""The data loader, trainer, evaluation and prompting on small synthetic shards (seeded)."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from uvd.model.config import BOS_ID, EOS_ID, train_config_from_dict
from uvd.model.checkpoint import latest_checkpoint, load_model
from uvd.model.data import PackedLoader, Prefetcher, RowGroupReader, discover_runs, find_components
from uvd.model.evaluate import ablation_variants, evaluate, format_results, heldout_seq_len
from uvd.model.llama import LLaMA
from uvd.model.train import lr_at, train
from uvd.layout import shard_name
from uvd.manifest import write_manifest
from uvd.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


def image_tokens(rng: np.random.Generator, num_images: int) -> np.ndarray:
    """Learnable images: each a run of consecutive ids from a random start, within 64 ids."""
    starts = rng.integers(0, 64, size=num_images)
    return np.concatenate([(s + np.arange(256)) % 64 for s in starts]).astype(np.uint16)


def write_run(run_dir: Path, source: str, tasks: dict[str, tuple[int, int]], num_shards: int, seed: int,
              status: str = "complete", row_group_size: int = 64) -> None:
    """tasks: task -> (sentences, images per sentence), spread over num_shards listed shards."""
    rng = np.random.default_rng(seed)
    rows = [
        {"id": f"{source}-{task}-{i}", "source": source, "task": task, "num_images": num_images,
         "tokens": image_tokens(rng, num_images), "images": [f"img{j}" for j in range(num_images)], "meta": "{}"}
        for task, (count, num_images) in tasks.items()
        for i in range(count)
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    (run_dir / "data").mkdir(parents=True)
    shards = {}
    for k in range(num_shards):
        part = rows[k::num_shards]
        name = shard_name(source, 0, k)
        write_shard(part, run_dir / name, row_group_size, "zstd", 3)
        by_task = {}
        for r in part:
            t = by_task.setdefault(r["task"], {"sentences": 0, "images": 0, "tokens": 0})
            t["sentences"] += 1
            t["images"] += r["num_images"]
            t["tokens"] += len(r["tokens"])
        shards[name] = {"sentences": len(part), "images": sum(t["images"] for t in by_task.values()),
                        "tokens": sum(t["tokens"] for t in by_task.values()), "by_task": by_task}
    # An unlisted (unfinished) shard that must never be read.
    write_shard(rows[:1], run_dir / shard_name(source, 0, num_shards), 64, "zstd", 3)
    (run_dir / shard_name(source, 0, num_shards)).write_bytes(b"not parquet")
    write_manifest(run_dir, {"schema_version": 2, "source": source, "recipe_hash": "0", "status": status,
                             "shards": shards, "tokenizer": {}})


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


def test_loader_position_is_the_same_for_any_number_of_ranks(runs):
    """A step is the next batch x world_size windows of one global stream: a position saved by
    2 ranks resumes on 1 rank (and back) at the same windows."""
    two = [PackedLoader([runs], 256, 2, seed=3, shuffle_buffer=8, rank=r, world_size=2) for r in (0, 1)]
    one = PackedLoader([runs], 256, 4, seed=3, shuffle_buffer=8)
    for _ in range(3):
        assert torch.equal(torch.cat([two[0].next_batch()[0], two[1].next_batch()[0]]), one.next_batch()[0])
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()
    moved = PackedLoader([runs], 256, 4, seed=3, shuffle_buffer=8)
    moved.load_state_dict(json.loads(json.dumps(two[1].state_dict())))
    back = [PackedLoader([runs], 256, 2, seed=3, shuffle_buffer=8, rank=r, world_size=2) for r in (0, 1)]
    for b in back:
        b.load_state_dict(one.state_dict())
    for _ in range(4):
        want = one.next_batch()[0]
        assert torch.equal(moved.next_batch()[0], want)
        assert torch.equal(torch.cat([back[0].next_batch()[0], back[1].next_batch()[0]]), want)


def test_prefetcher_gives_the_same_batches_and_the_consumed_position(runs):
    mixture = {"laion": 1.0, "video": 1.0}
    plain = PackedLoader([runs], 256, 3, mixture=mixture, shuffle_buffer=16, seed=0)
    fetch = Prefetcher(PackedLoader([runs], 256, 3, mixture=mixture, shuffle_buffer=16, seed=0), depth=4, pin=False)
    try:
        for _ in range(5):
            assert torch.equal(fetch.next_batch()[0], plain.next_batch()[0])
        deadline = time.time() + 10
        while fetch._queue.qsize() < 4 and time.time() < deadline:  # the worker is ahead by 4 batches
            time.sleep(0.01)
        assert fetch.loader.num_windows == (5 + 4 + 1) * 3 or fetch.loader.num_windows == (5 + 4) * 3
        state = fetch.state_dict()  # the position after the 5 batches handed out, not the worker's
        assert state == plain.state_dict() and state["num_windows"] == 15
        assert np.array_equal(fetch.drawn, plain.drawn)
    finally:
        fetch.close()
    resumed = Prefetcher(PackedLoader([runs], 256, 3, mixture=mixture, shuffle_buffer=16, seed=0), depth=2, pin=False)
    resumed.loader.load_state_dict(json.loads(json.dumps(state)))
    try:
        for _ in range(6):
            assert torch.equal(resumed.next_batch()[0], plain.next_batch()[0])
    finally:
        resumed.close()


def test_prefetcher_hands_a_data_error_to_the_trainer(tmp_path):
    write_run(tmp_path / "r", "laion", {"single": (4, 1)}, 1, 0)
    (tmp_path / "r" / "data/laion-000000-000.parquet").write_bytes(b"broken")  # a listed shard that cannot be read
    fetch = Prefetcher(PackedLoader([tmp_path], 256, 2, shuffle_buffer=2), depth=2, pin=False)
    with pytest.raises(Exception, match="(?i)parquet|magic|file"):
        fetch.next_batch()
    fetch.close()


def test_shards_are_read_by_row_group(tmp_path):
    write_run(tmp_path / "r", "laion", {"single": (100, 1)}, 1, 5, row_group_size=16)
    shard = tmp_path / "r" / "data/laion-000000-000.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(shard, columns=["tokens"]).column("tokens").to_pylist()
    reader = RowGroupReader(capacity=2)
    for row in (0, 15, 16, 99, 50, 3):
        assert reader.sentence(shard, row).tolist() == table[row]
    # rows 0 and 15 share group 0; 16 is group 1; 99 group 6; 50 group 3; row 3 is group 0 again (evicted)
    assert reader.num_reads == 5 and len(reader.groups) == 2
    assert all(len(offsets) - 1 <= 16 for _, offsets in reader.groups.values())  # never a whole shard
    # A stream reads its row groups in order, each once per epoch, however long a sentence stays in
    # the shuffle buffer: 100 rows in 7 groups, all of them through a 32-sentence buffer.
    stream = PackedLoader([tmp_path / "r"], 256, 1, shuffle_buffer=32).streams[0]
    drawn = [stream.next().tolist() for _ in range(69)]  # the 69th draw has taken the 100th row into the buffer
    assert stream.reader.num_reads == 7 and stream.row_pos == 100
    assert all(d in table for d in drawn)


def test_runs_follow_symlinks_and_leave_out_incomplete_ones(tmp_path, caplog):
    store = tmp_path / "store"
    write_run(store / "laion", "laion", {"single": (8, 1)}, 1, 0)
    write_run(store / "video", "video", {"video_s10": (4, 2)}, 1, 1, status="failed")
    write_run(store / "coco", "coco", {"detection": (4, 2)}, 1, 2, status="running")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("laion", "video", "coco"):
        (data / name).symlink_to(store / name, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a loop is walked once
    with caplog.at_level(logging.WARNING, logger="uvd.model.data"):
        keys = {c.key for c in find_components([data])}
    assert keys == {"laion"}
    assert "video" in caplog.text and "'failed'" in caplog.text and "'running'" in caplog.text
    assert "data.include_incomplete" in caplog.text
    assert {c.key for c in find_components([data], include_incomplete=True)} == {"laion", "video", "coco"}
    assert discover_runs([data / "laion"]) == [data / "laion"]  # a symlinked run folder given directly
    with pytest.raises(ValueError, match="data.include_incomplete"):
        find_components([data / "video"])
    cfg = config(data, tmp_path / "t", data={"include_incomplete": True})
    assert cfg.data.include_incomplete
    with pytest.raises(ValueError, match="data.runs"):
        discover_runs([tmp_path / "missing"])


def test_lr_schedule():
    from uvd.model.config import OptimOptions

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


def test_validation_loss_during_training_and_mfu(runs, eval_runs, tmp_path):
    cfg = config(runs, tmp_path / "v", train={"max_steps": 4, "eval_every": 2, "eval_batches": 2, "log_every": 1,
                                              "ckpt_every": 4, "peak_tflops": 0.5},
                 eval={"runs": [str(eval_runs)]})
    history = train(cfg)["history"]
    assert [h["step"] for h in history if "val_loss" in h] == [2, 4]
    # The last validation loss, recomputed independently from the final weights and held-out windows.
    model = load_model(tmp_path / "v")
    loader = PackedLoader([eval_runs], 256, 4, shuffle_buffer=1, seed=0)
    with torch.no_grad():
        want = np.mean([model(*loader.next_batch())[1].item() for _ in range(2)])
    assert history[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert logged[1]["val_loss"] == history[1]["val_loss"]
    flops = model.flops_per_token(256)
    for h in history:  # MFU from the measured step time and train.peak_tflops
        assert h["mfu"] == pytest.approx(h["tokens_per_s"] * flops / 0.5e12)
        assert h["tokens_per_s"] == pytest.approx(4 * 256 / h["step_time_s"])


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
    base = tmp_path / "abl"
    assert {n: Path(v.train.out) for n, v in variants.items()} == {n: base / n for n in variants}
    assert cfg.train.out == str(base) and cfg.data.mixture == {"video/video_s10": 2.0}  # the caller's config is intact
    keys = {c.key for c in find_components([runs], variants["no_video"].data.mixture)}
    assert keys == {"laion", "imagenet_groups"}


def test_cli_train_eval_prompt(runs, eval_runs, tmp_path, capsys):
    import uvd.tokenizer  # noqa: F401  (registers the tokenizer stage that decodes)
    from uvd.cli import main

    out = tmp_path / "cli"
    assert main(["train", str(ROOT / "recipes/train/tiny.yaml"), "--set", f"data.runs=[{runs}]",
                 "--set", f"train.out={out}", "--set", "train.max_steps=4", "--set", "data.seq_len=256",
                 "--set", "train.log_every=2", "--set", "optim.lr=3e-4", "--set", "optim.end_lr=3e-5"]) == 0
    assert (out / "config.yaml").is_file() and latest_checkpoint(out).name == "step_0000004"
    assert "lr: 0.0003" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(eval_runs), "--max-prompts", "1", "--windows", "1",
                 "--device", "cpu", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["heldout"]["seq_len"] == 256  # the trained window length, as the eval after `uvd train` uses
    sheet = tmp_path / "sheet.png"
    # The default sequential prompt, 15 frames + 1 generated, fits max_seq_len 4096 exactly.
    assert main(["prompt", str(out), "--data", str(eval_runs), "--mode", "sequential", "--task", "video_s10",
                 "--tokenizer-config", "test", "--out", str(sheet), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 15 * 128
    # A checkpoint written before trainer.json held seq_len: read from the training folder's config.yaml.
    info_path = latest_checkpoint(out) / "trainer.json"
    info = json.loads(info_path.read_text())
    del info["seq_len"]
    info_path.write_text(json.dumps(info))
    model = load_model(out)
    assert model.trained_seq_len == 256 and heldout_seq_len(model) == 256
    assert main(["train", str(ROOT / "recipes/train/tiny.yaml"), "--set", "data.mixture={nope: 1}",
                 "--set", f"data.runs=[{runs}]"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_ddp(runs, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "uvd.cli", "train", str(ROOT / "recipes/train/tiny.yaml"),
           "--set", f"data.runs=[{runs}]", "--set", f"train.out={out}", "--set", "train.max_steps=4",
           "--set", "data.seq_len=256", "--set", "train.batch_size=2", "--set", "train.ckpt_every=2",
           "--set", "train.parallel=ddp", "--set", "train.log_every=1", "--set", "train.grad_accum=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000004" and (ckpt / "model.safetensors").is_file()
    state = json.loads((ckpt / "data.json").read_text())
    assert state["num_windows"] == 4 * 2 * 2 * 2  # steps x micro-batches x ranks x batch: one global position
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["tokens"] == 4 * 2 * 2 * 2 * 256  # steps x accum x batch x ranks x seq_len
    assert 0 <= log[-1]["loader_share"] < 1 and log[-1]["step_time_s"] > 0
    load_model(out)
    # Resume under DDP from the DCP checkpoint (replicated tensors were written once).
    cmd[cmd.index("train.max_steps=4")] = "train.max_steps=5"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and np.isfinite(log[-1]["loss"])
