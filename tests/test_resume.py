"""Resume and repair at scale: byte-identical shards after a killed driver or worker, cached work
tied to the recipe that made it, only damaged parts redone, dedup as a distributed step, and the
same shards whatever the number of actors and batch sizes."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TEST_OVERRIDES
from uvd import layout as L
from uvd import manifest as M
from uvd.recipe import load_recipe
from uvd.runner import run_recipe

ROOT = Path(__file__).parents[1]


def write_shards(folder: Path, num_tars: int, per_tar: int, seed: int = 0, dup_every: int = 0) -> Path:
    """img2dataset-style tars of small distinct JPEGs; with `dup_every`, every n-th item repeats
    the bytes of an earlier one (inside its tar and across tars)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made: list[bytes] = []
    for t in range(num_tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                if dup_every and made and (t * per_tar + i) % dup_every == dup_every - 1:
                    data = made[int(rng.integers(len(made)))]
                else:
                    pixels = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, "JPEG", quality=80)
                    data = buf.getvalue()
                    made.append(data)
                key = f"{t:05d}{i:04d}"
                for ext, payload in (("jpg", data), ("txt", b"a caption"), ("json", json.dumps({"url": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(payload), 1_700_000_000
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def recipe_for(inputs: Path, *extra: str):
    return load_recipe(ROOT / "recipes/laion.yaml", [f"inputs={inputs}", *TEST_OVERRIDES, "output.units_per_part=1", *extra])


def shard_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in M.read_manifest(run)["shards"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("tars"), num_tars=4, per_tar=40, dup_every=7)


@pytest.fixture(scope="module")
def reference(ray_local, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_recipe(recipe_for(shards), out, progress=False)
    return out


# ---------------------------------------------------------------- dedup


def test_dedup_keeps_the_first_occurrence_in_input_order(reference, shards):
    """The distributed dedup equals the plain rule: walk items in input order, first bytes win."""
    first: dict[bytes, str] = {}
    expected = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    data = tar.extractfile(info).read()
                    key = f"{tar_path.name}/{info.name[:-4]}"
                    if data in first:
                        expected[key] = first[data]
                    else:
                        first[data] = key
    assert len(expected) >= 20  # duplicates inside tars and across them
    got = {r["key"]: r["detail"] for r in M.read_rejects(reference).to_pylist() if r["reason"] == "duplicate"}
    assert got == {key: f"same bytes as {winner}" for key, winner in expected.items()}


def test_find_duplicates_matches_a_plain_loop_on_random_digests():
    import pyarrow as pa

    from uvd.dedup import find_duplicates

    rng = np.random.default_rng(3)
    pool = [rng.bytes(16) for _ in range(50)]
    rows = [(int(p), int(o), pool[int(rng.integers(50))]) for p in range(5) for o in range(40)]
    order = rng.permutation(len(rows))  # the bucket files come in any order
    table = pa.table({"digest": pa.array([rows[i][2] for i in order], pa.binary(16)),
                      "part": pa.array([rows[i][0] for i in order], pa.int32()),
                      "ordinal": pa.array([rows[i][1] for i in order], pa.int32()),
                      "unit": pa.array([rows[i][0] for i in order], pa.int32()),
                      "key": pa.array([f"{rows[i][0]}/{rows[i][1]}" for i in order])})
    first, expected = {}, []
    for part, ordinal, digest in sorted(rows):
        if digest in first:
            expected.append((part, ordinal, first[digest]))
        else:
            first[digest] = f"{part}/{ordinal}"
    got = find_duplicates(table).to_pydict()
    assert list(zip(got["part"], got["ordinal"], got["winner"])) == expected


def test_two_round_dedup_over_many_groups_and_ranges_matches_a_plain_loop(tmp_path):
    """Gather tasks over groups of parts, then one decision task per bucket range (uvd/dedup.py),
    with tiny task sizes so there are several of each: the losers equal a plain first-occurrence
    loop over (part, ordinal), and every decision file holds only its own range."""
    import pyarrow as pa

    from uvd.dedup import bucket_ranges, dedup_task, find_duplicates, gather_task, part_groups
    from uvd.shards import table_bytes

    rng = np.random.default_rng(11)
    pool = [rng.bytes(16) for _ in range(120)]
    sizes = [0, 37, 5, 60, 0, 22, 41]  # parts with no kept image too
    rows = []
    for part, n in enumerate(sizes):
        digests = [pool[int(rng.integers(len(pool)))] for _ in range(n)]
        order = sorted(range(n), key=lambda j: (int.from_bytes(digests[j][:2], "big"), digests[j]))
        table = pa.table({"bucket": pa.array([int.from_bytes(digests[j][:2], "big") for j in order], pa.int32()),
                          "digest": pa.array([digests[j] for j in order], pa.binary(16)),
                          "part": pa.array([part] * n, pa.int32()), "ordinal": pa.array([2 * j for j in order], pa.int32()),
                          "unit": pa.array([part] * n, pa.int32()), "key": pa.array([f"{part}/{2 * j}" for j in order], pa.string())})
        L.atomic_write_bytes(tmp_path / L.WORK_DIR / f"{L.part_name(part)}.digests.parquet", table_bytes(table))
        rows += [(part, 2 * j, digests[j]) for j in range(n)]
    groups, ranges = part_groups(sizes, rows_per_task=40), bucket_ranges(sum(sizes), rows_per_task=30)
    assert len(groups) >= 3 and len(ranges) >= 5
    assert [g for g in groups if g[0] < g[1]] == groups and groups[0][0] == 0 and groups[-1][1] == len(sizes)
    for g, (first, end) in enumerate(groups):
        gather_task(str(tmp_path), g, first, end, ranges)
    found = []
    for t, (lo, hi) in enumerate(ranges):
        dedup_task(str(tmp_path), len(groups), t, lo, hi)
        dups = pq.read_table(tmp_path / L.PLAN_DIR / f"dups-{t:05d}.parquet").to_pydict()
        found += list(zip(dups["part"], dups["ordinal"], dups["winner"]))
    first_of, expected = {}, []
    for part, ordinal, digest in sorted(rows):
        if digest in first_of:
            expected.append((part, ordinal, first_of[digest]))
        else:
            first_of[digest] = f"{part}/{ordinal}"
    assert len(expected) > 30
    assert sorted(found) == expected
    everything = pa.concat_tables([pq.read_table(tmp_path / L.WORK_DIR / f"{L.part_name(p)}.digests.parquet")
                                   for p in range(len(sizes))])
    one_round = find_duplicates(everything).to_pydict()  # all digests in one task: the same decisions
    assert sorted(zip(one_round["part"], one_round["ordinal"], one_round["winner"])) == expected


# ---------------------------------------------------------------- determinism


@pytest.mark.timeout(900)
def test_same_shards_for_any_actor_count_batch_size_and_part_size(ray_local, tmp_path):
    """Units of a thousand items: 1 actor with batch 16 vs 2 actors with batch 7 give
    byte-identical shards (each unit spans many encoder batches spread over both actors)."""
    inputs = write_shards(tmp_path / "big", num_tars=2, per_tar=1000, seed=5)
    a = tmp_path / "a"
    run_recipe(recipe_for(inputs, "output.sentences_per_shard=1000"), a, progress=False)
    b = tmp_path / "b"
    run_recipe(recipe_for(inputs, "output.sentences_per_shard=1000", "tokenizer.num_actors=2", "tokenizer.batch_size=7"),
               b, progress=False)
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 2


# ---------------------------------------------------------------- cached work is tied to its recipe


@pytest.mark.parametrize("override", ["tokenizer.seed=1", "image.resize=resize", "filters.min_side=70", "seed=3",
                                      "tokenizer.dtype=bfloat16"])
def test_work_made_under_another_recipe_is_recomputed_never_relabelled(ray_local, shards, tmp_path, override):
    out = tmp_path / "run"
    big_parts = "output.units_per_part=2"  # 2 parts: fewer tasks, the same check
    first = run_recipe(recipe_for(shards, "output.keep_work=true", big_parts), out, progress=False)
    (out / M.MANIFEST).unlink()  # the guard a user might delete; the work files stay
    second = run_recipe(recipe_for(shards, "output.keep_work=true", big_parts, override), out, progress=False)
    assert second.parts_tokenized == first.parts_tokenized == 2
    fresh = tmp_path / "fresh"
    run_recipe(recipe_for(shards, big_parts, override), fresh, progress=False)
    assert shard_bytes(out) == shard_bytes(fresh)  # exactly what a fresh run of the new recipe gives


# ---------------------------------------------------------------- repair


def test_a_deleted_or_truncated_shard_redoes_only_its_part(ray_local, shards, reference, tmp_path, capsys):
    import shutil

    from uvd.cli import main

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    names = sorted(M.read_manifest(run)["shards"])
    (run / names[1]).unlink()
    data = (run / names[4]).read_bytes()
    (run / names[4]).write_bytes(data[: len(data) // 2])  # cut short after the run finished
    assert main(["stats", str(run)]) == 2 and names[1] in capsys.readouterr().err
    (run / names[1]).write_bytes(b"")  # present but damaged: only --verify notices the checksum
    assert main(["stats", str(run), "--verify", "--json"]) == 3
    damaged = {Path(d["shard"]).name for d in json.loads(capsys.readouterr().out)["damaged"]}
    assert damaged == {Path(names[1]).name, Path(names[4]).name}
    summary = run_recipe(recipe_for(shards), run, progress=False)
    assert not summary.already_complete and summary.parts_written == 2 and summary.parts_tokenized == 2
    assert shard_bytes(run) == shard_bytes(reference)
    again = run_recipe(recipe_for(shards), run, progress=False, verify=True)
    assert again.already_complete


# ---------------------------------------------------------------- kills


def _uvd(out: Path, inputs: Path, *extra: str) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "uvd"), "run", str(ROOT / "recipes/laion.yaml"), "--out", str(out), "--quiet",
            "--set", f"inputs={inputs}", "--set", "output.units_per_part=1"]
    for o in [*TEST_OVERRIDES, *extra]:
        args += ["--set", o]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait_for(pattern: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(pattern.parent.glob(pattern.name)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out waiting for " + str(pattern)
        time.sleep(0.05)


def _session_processes(session_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if session_dir in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.timeout(900)
@pytest.mark.parametrize("phase", ["tokenize", "write"])
def test_a_killed_driver_resumes_to_byte_identical_shards(shards, reference, tmp_path, phase):
    from uvd.runtime import SESSIONS_DIR

    out = tmp_path / "run"
    proc = _uvd(out, shards)
    _wait_for(out / (L.PARTS_DIR if phase == "tokenize" else L.WRITES_DIR) / "*.json", proc)
    record = SESSIONS_DIR / f"{proc.pid}.json"
    session_dir = json.loads(record.read_text())["session_dir"] if record.is_file() else None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert M.read_manifest(out)["status"] == "running"
    rerun = _uvd(out, shards)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert shard_bytes(out) == shard_bytes(reference)
    if session_dir:  # what the killed driver's embedded Ray left running was stopped by the next start
        assert _session_processes(session_dir) == []


@pytest.mark.timeout(900)
def test_a_killed_reader_task_is_retried_to_byte_identical_shards(shards, reference, tmp_path):
    out = tmp_path / "run"
    proc = _uvd(out, shards)
    killed, deadline = False, time.time() + 240
    while not killed and time.time() < deadline and proc.poll() is None:
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::tokenize_part"):
                    os.kill(int(p.name), signal.SIGKILL)
                    killed = True
                    break
            except OSError:
                pass
        time.sleep(0.02)
    _, err = proc.communicate(timeout=600)
    assert killed and proc.returncode == 0, err[-3000:]
    assert shard_bytes(out) == shard_bytes(reference)
