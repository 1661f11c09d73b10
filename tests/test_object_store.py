"""Runs in an object store: inputs and --out as s3:// URIs, against a local S3-compatible server
(moto's server mode on 127.0.0.1, as s3fs's own tests use it). The same commit protocol as on
disk: a run killed mid-way and resumed there gives shards byte-identical to a local run; the
lock, the "is this folder ours" check and --overwrite work on prefixes; stats and the trainer's
loader read the run from the store."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_OVERRIDES
from test_resume import recipe_for, shard_bytes, write_shards
from uvd import layout as L
from uvd import manifest as M
from uvd import storage as S
from uvd.runner import run_recipe

ROOT = Path(__file__).parents[1]
BUCKET = "uvd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the environment that points boto/s3fs at it."""
    pytest.importorskip("s3fs")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield env
    server.terminate()
    server.wait(timeout=30)


def _fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)  # a fresh listing cache: what another process sees


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("s3tars"), num_tars=3, per_tar=30, seed=5, dup_every=6)


@pytest.fixture(scope="module")
def stored_tars(s3_env, tars):
    """The same tars (and nothing else) under s3://BUCKET/laion/."""
    fs = _fs()
    for path in sorted(tars.glob("*.tar")):
        fs.pipe_file(f"{BUCKET}/laion/{path.name}", path.read_bytes())
    return f"s3://{BUCKET}/laion/"


@pytest.fixture(scope="module")
def local_run(ray_local, tars, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    run_recipe(recipe_for(tars), out, progress=False)
    return out


def _uvd_run(out: str, inputs: str, env: dict, *extra: str) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "uvd"), "run", str(ROOT / "recipes/laion.yaml"), "--out", out, "--quiet",
            "--set", f"inputs={inputs}", "--set", "output.units_per_part=1"]
    for o in [*TEST_OVERRIDES, *extra]:
        args += ["--set", o]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "RAY_AUTH_MODE": "disabled"})


def _stored_bytes(uri: str) -> dict[str, bytes]:
    run = S.as_path(uri)
    return {name: (run / name).read_bytes() for name in M.read_manifest(run)["shards"]}


@pytest.mark.timeout(900)
def test_a_run_killed_in_an_object_store_resumes_to_the_local_runs_bytes(s3_env, stored_tars, local_run):
    out = f"s3://{BUCKET}/runs/laion"
    proc = _uvd_run(out, stored_tars, s3_env)
    fs, deadline = _fs(), time.time() + 300
    while True:  # killed once the first part is tokenized (its record is in the store)
        fs.invalidate_cache()
        if fs.glob(f"{BUCKET}/runs/laion/{L.PARTS_DIR}/*.json"):
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no part was tokenized in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert M.read_manifest(S.as_path(out))["status"] == "running"
    assert (S.as_path(out) / L.LOCK_FILE).exists()  # the killed driver's lock is still there

    rerun = _uvd_run(out, stored_tars, s3_env)  # the killed driver's lock is taken over (its pid is gone)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    run = S.as_path(out)
    manifest = M.read_manifest(run)
    assert manifest["status"] == "complete"
    assert _stored_bytes(out) == shard_bytes(local_run)  # same names, same bytes
    # rejects: the same inputs and reasons (the unit column names where each input was read from)
    stored = sorted((r["key"], r["reason"], r["detail"]) for r in M.read_rejects(run).to_pylist())
    local = sorted((r["key"], r["reason"], r["detail"]) for r in M.read_rejects(local_run).to_pylist())
    assert stored == local and any(r[1] == "duplicate" for r in stored)
    assert {r["unit"] for r in M.read_rejects(run).to_pylist()} <= {f"{stored_tars}{n:05d}.tar" for n in range(3)}
    # nothing partial or temporary left, the work files removed, the lock released
    names = {p.rsplit("/", 1)[1] for p in _fs().find(f"{BUCKET}/runs/laion")}
    assert not any(n.endswith(".tmp") for n in names) and "lock" not in names
    assert not _fs().glob(f"{BUCKET}/runs/laion/{L.WORK_DIR}/*")

    # readers: stats and the trainer's loader read the run in the store
    from uvd.model.data import iter_sentences
    from uvd.stats import compute_stats

    stats = compute_stats(out, verify=True)
    assert stats["damaged"] == [] and stats["totals"]["sentences"] == manifest["totals"]["sentences"] > 0
    assert stats["runs"][0]["path"] == "."
    assert len(list(iter_sentences([f"s3://{BUCKET}/runs"]))) == manifest["totals"]["sentences"]
    from uvd.model.data import PackedLoader  # the trainer's loader: the same batches as from the local run

    stored_loader, local_loader = (PackedLoader([r], seq_len=256, batch_size=2, shuffle_buffer=8)
                                   for r in (f"s3://{BUCKET}/runs", local_run))
    for _ in range(3):
        (xs, ys), (xl, yl) = stored_loader.next_batch(), local_loader.next_batch()
        assert xs.equal(xl) and ys.equal(yl)

    again = run_recipe(recipe_for(stored_tars), out, progress=False, verify=True)  # every checksum read back
    assert again.already_complete and M.read_manifest(run)["updated"] == manifest["updated"]


def test_an_object_store_lock_refuses_a_live_holder_and_takes_over_a_dead_one(s3_env):
    run = S.as_path(f"s3://{BUCKET}/locks/run")
    with L.RunLock(run):
        holder = json.loads((run / L.LOCK_FILE).read_bytes())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ValueError, match=f"another `uvd run` is writing this folder \\(pid {os.getpid()}"):
            with L.RunLock(run):
                pass
    assert not (run / L.LOCK_FILE).exists()  # released
    # a lock left by a process that no longer exists on this host is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "token": "x", "since": time.time(), "heartbeat": time.time()}
    (run / L.LOCK_FILE).write_bytes(json.dumps(stale).encode())
    with L.RunLock(run):
        assert json.loads((run / L.LOCK_FILE).read_bytes())["pid"] == os.getpid()
    # a silent holder elsewhere is taken over only once its heartbeat is old
    other = {"host": "another-host", "pid": 1, "token": "y", "since": 0, "heartbeat": time.time()}
    (run / L.LOCK_FILE).write_bytes(json.dumps(other).encode())
    with pytest.raises(ValueError, match="on another-host"):
        with L.RunLock(run):
            pass
    (run / L.LOCK_FILE).write_bytes(json.dumps({**other, "heartbeat": time.time() - 3600}).encode())
    with L.RunLock(run):
        pass


def test_a_prefix_holding_foreign_objects_is_refused_and_overwrite_deletes_only_uvds(s3_env, tars):
    fs = _fs()
    fs.pipe_file(f"{BUCKET}/mixed/notes.txt", b"the user's")
    with pytest.raises(ValueError, match="holds files UVD did not write \\(notes.txt\\)"):
        run_recipe(recipe_for(tars), f"s3://{BUCKET}/mixed", progress=False)
    assert fs.cat_file(f"{BUCKET}/mixed/notes.txt") == b"the user's"
    # a run of UVD's own with a stray object in data/ that is not a shard name: refused too
    own = S.as_path(f"s3://{BUCKET}/own")
    L.write_json(own / L.MANIFEST, {"schema_version": 2, "source": "laion", "recipe_hash": "x", "status": "complete",
                                    "shards": {}})
    L.atomic_write_bytes(own / "data/laion-000000-000.parquet", b"ours")
    L.atomic_write_bytes(own / L.PARTS_DIR / "000000.json", b"{}")
    assert L.foreign_entries(own) == []
    assert L.clear_run(own) == 3
    assert not _fs().find(f"{BUCKET}/own")


def test_uri_inputs_for_a_source_that_reads_local_files_are_a_clear_error():
    from uvd.source import resolve_inputs

    with pytest.raises(ValueError, match="reads local files only"):
        resolve_inputs(["s3://bucket/coco"])
    from uvd.push import push_run

    with pytest.raises(ValueError, match="uploads a local run folder"):
        push_run("s3://bucket/run", "me/x")
    assert S.is_uri("s3://b/x") and S.is_uri("hf://datasets/x") and not S.is_uri("/data/x")
    assert not S.is_uri("file:///data/x") and S.as_path("file:///data/x") == Path("/data/x")


def test_as_path_keeps_what_a_location_is(tmp_path):
    remote = S.as_path("s3://bucket/run")
    assert S.as_path(remote) is remote and str(remote / "data") == "s3://bucket/run/data"
    assert S.is_remote(remote / "x") and not S.is_remote(S.as_path(tmp_path))
    assert S.as_path(str(tmp_path)) == tmp_path and isinstance(S.as_path(tmp_path), Path)
