"""The trainer at scale, small: resume after SIGKILL, FSDP checkpoints resumed on another number of
ranks (2 -> 1, 1 -> 2, CPU/gloo), and gradient accumulation without a reduction per micro-batch."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uvd.model.checkpoint import latest_checkpoint, load_model
from uvd.model.config import model_config
from uvd.model.llama import LLaMA
from uvd.model.train import _forward_backward, train
from test_train import ROOT, _free_port, config, write_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_runs")
    write_run(root / "laion", "laion", {"single": (60, 1)}, 2, 10)
    write_run(root / "video", "video", {"video_s10": (20, 2)}, 2, 11)
    return root


def train_cmd(runs: Path, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "uvd.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "uvd.cli"]
    sets = [f"data.runs=[{runs}]", f"train.out={out}", "data.seq_len=256", "data.shuffle_buffer=16",
            "train.log_every=1", "optim.warmup_steps=2", *overrides]
    return launcher + ["train", str(ROOT / "recipes/train/tiny.yaml")] + [a for s in sets for a in ("--set", s)]


def losses(out: Path) -> dict[int, float]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps)), steps  # each step logged once, also after a resume
    return {r["step"]: r["loss"] for r in log}


def test_resume_after_sigkill_gives_the_same_losses_and_weights(runs, tmp_path):
    sets = ("train.max_steps=16", "train.ckpt_every=3", "train.grad_accum=2", "train.batch_size=2")
    straight = subprocess.run(train_cmd(runs, tmp_path / "a", *sets), capture_output=True, text=True, env=ENV,
                              timeout=300, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = subprocess.Popen(train_cmd(runs, tmp_path / "b", *sets), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "b") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-run: between checkpoints, or while one is written
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = int(latest_checkpoint(tmp_path / "b").name.split("_")[1])
    assert 3 <= killed_at < 16
    resumed = subprocess.run(train_cmd(runs, tmp_path / "b", *sets), capture_output=True, text=True, env=ENV,
                             timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / f'step_{killed_at:07d}'}" in resumed.stderr
    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(got) == list(range(1, 17))
    assert got == want  # bit-exact: the same batches, weights and optimizer state
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(runs, tmp_path):
    """The same global batch (4 windows) on 1 rank or 2 FSDP ranks: steps 1-2 on 1 rank, 3-5 on 2
    ranks (1 -> 2), 6-7 on 1 rank again (2 -> 1), each resuming from the DCP checkpoint the other
    layout wrote, give the losses and weights of an uninterrupted 1-rank run."""
    # A flat lr after warmup: the phases stop at different max_steps, which would move a cosine schedule.
    sections = {"data": {"shuffle_buffer": 16}, "optim": {"warmup_steps": 2, "lr": 3e-3, "end_lr": 3e-3}}
    ref = train(config(runs, tmp_path / "ref", **sections, train={"max_steps": 7, "ckpt_every": 7, "log_every": 1}))
    want = {h["step"]: h["loss"] for h in ref["history"]}
    out = tmp_path / "run"

    def one_rank(max_steps: int) -> None:  # in this process, as the reference
        train(config(runs, out, **sections, train={"max_steps": max_steps, "ckpt_every": 2, "log_every": 1,
                                                   "parallel": "fsdp"}))

    one_rank(2)
    assert json.loads((latest_checkpoint(out) / "trainer.json").read_text())["world_size"] == 1
    sets = ("train.max_steps=5", "train.ckpt_every=2", "train.parallel=fsdp", "train.batch_size=2",
            "optim.lr=3e-3", "optim.end_lr=3e-3")
    proc = subprocess.run(train_cmd(runs, out, *sets, nproc=2), capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "written by 1 rank(s); now 2" in proc.stderr
    middle, last = out / "checkpoints" / "step_0000004", latest_checkpoint(out)
    assert last.name == "step_0000005" and json.loads((last / "trainer.json").read_text())["world_size"] == 2
    assert not (middle / "model.safetensors").exists()  # a training checkpoint gathers nothing
    assert len(list((middle / "state").glob("*.distcp"))) == 2  # each rank wrote its own shards
    assert (last / "model.safetensors").is_file()  # the final model's full weights
    one_rank(7)
    got = losses(out)
    assert sorted(got) == list(range(1, 8))
    for step in range(1, 8):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got, want)
    a, b = load_model(tmp_path / "ref"), load_model(out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


# The model of the accumulation test has a sparse MoE block: every expert must take part on every
# rank (some get no tokens on a rank) for DDP's and FSDP's reductions.
MOE = {"moe_experts": 4, "moe_every": 2, "moe_top_k": 1}


def _accumulation_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    x = torch.randint(0, 8192, (2, 2, 2, 32), generator=torch.Generator().manual_seed(0))  # (rank, micro, B, T)
    results = {}
    for kind in ("ddp", "fsdp"):
        for no_sync in (False, True):
            torch.manual_seed(1)
            raw = LLaMA(model_config("tiny", max_seq_len=64, num_kv_heads=2, **MOE))
            if kind == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(raw)
            else:
                for block in raw.layers:
                    fully_shard(block)
                model = fully_shard(raw)
            reduced_early = None
            for micro in range(2):
                sync = micro == 1 or not no_sync
                _forward_backward(model, model, x[rank, micro], x[rank, micro], contextlib.nullcontext(), 0.5, sync)
                if micro == 0:
                    if kind == "fsdp":  # reduce-scattered gradients land on the sharded parameters
                        reduced_early = all(p.grad is not None for p in raw.parameters())
                    else:  # after an all-reduce both ranks hold the same gradient
                        g = raw.lm_head.weight.grad.clone()
                        other = [torch.zeros_like(g) for _ in range(2)]
                        dist.all_gather(other, g)
                        reduced_early = torch.equal(other[0], other[1])
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for n, p in raw.named_parameters()}
            results[f"{kind}_{'nosync' if no_sync else 'sync'}"] = {"grads": grads, "reduced_early": reduced_early}
    if rank == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_grad_accumulation_without_per_micro_batch_reduction_gives_the_same_gradients(tmp_path):
    result_file = tmp_path / "grads.pt"
    mp.spawn(_accumulation_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=2, join=True)
    results = torch.load(result_file, weights_only=True)
    # Reference: one process, the mean loss of all 4 micro-batches (2 ranks x 2).
    torch.manual_seed(1)
    model = LLaMA(model_config("tiny", max_seq_len=64, num_kv_heads=2, **MOE))
    x = torch.randint(0, 8192, (2, 2, 2, 32), generator=torch.Generator().manual_seed(0))
    sum(model(x[r, m], x[r, m])[1] for r in range(2) for m in range(2)).div(4).backward()
    for name, result in results.items():
        for n, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][n], p.grad, atol=2e-6, rtol=1e-4, msg=f"{name} {n}")
        assert result["reduced_early"] == name.endswith("_sync"), name  # no_sync: nothing reduced on micro 0
